"""Models: config dataclasses, loading (full / LoRA / QLoRA / adapter), a tiny from-scratch Llama, export."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from selfexplore.models.spec import LoraSpec, ModelSpec, TinyLlamaConfig

if TYPE_CHECKING:
    from selfexplore.models.export import export_policy
    from selfexplore.models.files import load_tokenizer
    from selfexplore.models.load import load_model
    from selfexplore.models.tiny import build_tiny_llama

# Imported on first use: peft imports bitsandbytes (seconds, and a kernel warning on CPU), which
# commands that only read configs (`--help`, `status`) must not pay for.
_LAZY = {"export_policy": "selfexplore.models.export", "load_model": "selfexplore.models.load",
         "build_tiny_llama": "selfexplore.models.tiny", "load_tokenizer": "selfexplore.models.files"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


__all__ = [
    "LoraSpec",
    "ModelSpec",
    "TinyLlamaConfig",
    "build_tiny_llama",
    "export_policy",
    "load_model",
    "load_tokenizer",
]
