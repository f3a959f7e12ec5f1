"""Tokenization and batching shared by the SFT and preference data modules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def encode_prompt_completion(tokenizer, prompt: str, completion: str,
                             add_eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt and completion, encoded SEPARATELY.

    Why separately: a step-level prompt ends mid-rationale, and encoding the joined string
    would let BPE merge tokens across the boundary, so the completion the loss sees would not
    be the one the sampler produced. The prompt gets the tokenizer's special tokens (BOS, as in
    pre-training); the completion gets none, plus EOS when `add_eos`.
    """
    prompt_ids = list(tokenizer(prompt).input_ids)
    completion_ids = list(tokenizer(completion, add_special_tokens=False).input_ids)
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set one or disable EOS")
        completion_ids.append(tokenizer.eos_token_id)
    return prompt_ids, completion_ids


def pad_right(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """A [N, max_len] long tensor of right-padded sequences."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


class LengthGroupedSampler(Sampler[int]):
    """Shuffled indices in which each run of `batch_size` has similar lengths (less padding).

    Indices are shuffled, cut into mega-chunks of `batch_size * mega_batches`, each chunk is
    sorted by length, and the resulting batches are shuffled again. Deterministic per seed and
    epoch (Lightning calls `set_epoch`); works under Lightning's distributed sampler wrapper.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0,
                 mega_batches: int = 50) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start : start + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        for b in torch.randperm(len(batches), generator=g).tolist():
            yield from batches[b]
