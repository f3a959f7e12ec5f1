"""Models: config dataclasses, loading (full / LoRA / QLoRA / adapter), a tiny from-scratch Llama, export."""

from selfexplore.models.export import export_policy
from selfexplore.models.load import load_model
from selfexplore.models.spec import LoraSpec, ModelSpec, TinyLlamaConfig
from selfexplore.models.tiny import build_tiny_llama
from selfexplore.models.tokenizer import load_tokenizer

__all__ = [
    "LoraSpec",
    "ModelSpec",
    "TinyLlamaConfig",
    "build_tiny_llama",
    "export_policy",
    "load_model",
    "load_tokenizer",
]
