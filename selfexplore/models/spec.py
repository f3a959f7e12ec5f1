"""Config dataclasses for models: plain typed fields so LightningCLI/jsonargparse read them from YAML.

Validation happens in `__post_init__` so a bad config fails when it is parsed, with a message
naming the field, not deep inside transformers or peft.
"""

from dataclasses import dataclass
from typing import Literal

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# Head sizes vLLM's CPU attention backend accepts; a tiny model outside this set trains fine
# but cannot be sampled with vLLM, which only shows up rounds later. Fail at config time instead.
VLLM_HEAD_DIMS: tuple[int, ...] = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)

# Byte-level BPE always holds the 256 byte symbols plus our 4 special tokens.
MIN_TINY_VOCAB = 256 + 4


def parse_dtype(name: str) -> torch.dtype:
    """A torch dtype from its config spelling ('float32', 'bf16', ...)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype '{name}' is not one of {sorted(_DTYPES)}") from None


@dataclass
class LoraSpec:
    """A new LoRA adapter (peft `LoraConfig`); `target_modules='all-linear'` skips the LM head."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelSpec:
    """Which causal LM to load and how: full fine-tuning, LoRA, QLoRA (nf4 + LoRA), or a saved adapter.

    `lora` creates a fresh adapter; `adapter_path` continues a saved one on top of `path`
    (set at most one). `quantization='nf4'` loads the base in 4 bits and needs an adapter,
    since 4-bit weights cannot be trained directly.
    """

    path: str
    dtype: str = "float32"
    trust_remote_code: bool = False
    lora: LoraSpec | None = None
    quantization: Literal["nf4"] | None = None
    adapter_path: str | None = None
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        self.path = str(self.path)
        parse_dtype(self.dtype)
        if isinstance(self.lora, dict):
            self.lora = LoraSpec(**self.lora)
        if self.adapter_path is not None:
            self.adapter_path = str(self.adapter_path)
        if self.quantization not in (None, "nf4"):
            raise ValueError(f"quantization must be 'nf4' or None, got {self.quantization!r}")
        if self.lora is not None and self.adapter_path is not None:
            raise ValueError("set either lora (new adapter) or adapter_path (saved adapter), not both")
        if self.quantization == "nf4" and self.lora is None and self.adapter_path is None:
            raise ValueError("quantization='nf4' (QLoRA) needs lora or adapter_path: 4-bit weights are not trainable")


@dataclass
class TinyLlamaConfig:
    """Shape of a from-scratch Llama for CPU runs; `vocab_size` is the tokenizer's training target.

    Embeddings are tied to the LM head by default (like SmolLM2): with a vocabulary this small
    relative to the model, untied heads mostly add parameters that tiny data cannot fit.
    `min_frequency` is how often a pair must occur in the texts to become a BPE merge.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 512
    vocab_size: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    min_frequency: int = 2

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim not in VLLM_HEAD_DIMS:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim}; vLLM's CPU backend needs one of "
                f"{VLLM_HEAD_DIMS} (e.g. hidden_size={32 * self.num_heads} for {self.num_heads} heads)")
        if self.vocab_size < MIN_TINY_VOCAB:
            raise ValueError(f"vocab_size must be >= {MIN_TINY_VOCAB} (256 bytes + 4 special tokens), "
                             f"got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads
