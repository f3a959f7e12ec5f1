"""Evaluation decoding of a live (possibly sharded) policy, apart from the module that trains it."""

from __future__ import annotations

import torch

from selfexplore.sampling.base import DrawParams
from selfexplore.sampling.hf import HFSampler


def greedy_complete(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int,
                    stop: list[str] | None) -> list[str]:
    """Greedy completions (the paper's evaluation decoding); one string per prompt, "" if skipped.

    Under FSDP every rank must call it (HF generate then runs in step across ranks)."""
    sampler = HFSampler(model, tokenizer, batch_size=max(1, len(prompts)), overlong_prompts="truncate")
    out = sampler.generate(prompts, n=1, draws=DrawParams(0.0, 1.0, max_new_tokens, stop), seed=0)
    return [c[0] if c else "" for c in out]
