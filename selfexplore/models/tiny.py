"""A tiny Llama trained from scratch: tokenizer from the task's own texts, seeded random weights.

The result is a normal Hugging Face folder, so every later stage (peft, HF generate, vLLM)
treats it exactly like a hub model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from selfexplore.io import atomic_dir
from selfexplore.models.spec import TinyLlamaConfig
from selfexplore.models.tokenizer import save_tokenizer, train_bpe_tokenizer

#: Named shapes shared by the tests and the benches, so a bench measures the model the tests check.
#: 'test': the test suite's model; 'small': `TinyLlamaConfig`'s defaults at a 320-token vocabulary;
#: '42m' / '205m': large enough that weights and optimizer states outweigh the imports (memory benches).
TINY_SHAPES: dict[str, dict[str, int]] = {
    "test": {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128,
             "max_position_embeddings": 256, "vocab_size": 300},
    "small": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 352,
              "max_position_embeddings": 256, "vocab_size": 320},
    "42m": {"hidden_size": 768, "num_layers": 6, "num_heads": 12, "num_kv_heads": 12, "intermediate_size": 2048,
            "max_position_embeddings": 256, "vocab_size": 300},
    "205m": {"hidden_size": 1024, "num_layers": 16, "num_heads": 16, "num_kv_heads": 16, "intermediate_size": 2816,
             "max_position_embeddings": 256, "vocab_size": 300},
}


def tiny_shape(name: str, **overrides: int) -> TinyLlamaConfig:
    """The named shape of `TINY_SHAPES`, with `overrides` (e.g. a larger vocabulary) on top."""
    if name not in TINY_SHAPES:
        raise ValueError(f"unknown tiny shape {name!r}; expected one of {sorted(TINY_SHAPES)}")
    return TinyLlamaConfig(**{**TINY_SHAPES[name], **overrides})


def init_tiny_llama(tokenizer: PreTrainedTokenizerBase, config: TinyLlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """Randomly initialised Llama sized to `tokenizer`; same seed, same weights (global RNG untouched)."""
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llama(texts: Iterable[str], out_dir: str | os.PathLike,
                     config: TinyLlamaConfig | None = None, seed: int = 0) -> Path:
    """Train a BPE tokenizer on `texts`, init a Llama for it, save both to `out_dir` (atomically).

    `config` defaults to `TinyLlamaConfig()`. The tokenizer adds BOS on encode and never EOS
    (see `selfexplore.models.tokenizer`); bos/eos/pad ids are set in the model config and the
    generation config. The model vocabulary is the trained one, which may be smaller than
    `config.vocab_size` when the texts support fewer merges.
    """
    config = config or TinyLlamaConfig()
    tokenizer = train_bpe_tokenizer(texts, vocab_size=config.vocab_size, min_frequency=config.min_frequency,
                                    model_max_length=config.max_position_embeddings)
    model = init_tiny_llama(tokenizer, config, seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
    return Path(out_dir)
