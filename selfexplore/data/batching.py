"""Tokenization and batching shared by the SFT and preference data modules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler


def encode_prompt_completion(tokenizer, prompt: str, completion: str,
                             end_id: int | None) -> tuple[list[int], list[int]]:
    """Token ids of prompt and completion, encoded SEPARATELY; `end_id` appended unless None.

    Why separately: a step-level prompt ends mid-rationale, and encoding the joined string
    would let BPE merge tokens across the boundary, so the completion the loss sees would not
    be the one the sampler produced. The prompt gets the tokenizer's special tokens (BOS, as in
    pre-training); the completion gets none. `end_id` is normally
    `selfexplore.models.chat.completion_end_id(tokenizer)` (EOS, or the chat template's
    end-of-turn token), the token the samplers stop on.
    """
    prompt_ids = list(tokenizer(prompt).input_ids)
    completion_ids = encode_continuation(tokenizer, completion)
    if end_id is not None:
        completion_ids.append(end_id)
    return prompt_ids, completion_ids


# What a continuation is encoded after when the tokenizer marks the start of every text: a line break,
# which every tokenizer keeps as its own token(s) and after which no word-boundary marker is added.
_ANCHOR = "\n"


def inserts_prefix_space(tokenizer) -> bool:
    """Whether encoding a text on its own starts it with a word-boundary marker (SentencePiece "▁",
    byte-level "Ġ"): the legacy Llama / Mistral tokenizers prepend "▁" to every encoded text."""
    ids = tokenizer("1", add_special_tokens=False).input_ids
    return bool(ids) and tokenizer.convert_ids_to_tokens(ids)[0].startswith(("\u2581", "\u0120"))


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as they follow a prompt, without special tokens.

    A tokenizer that prepends a word-boundary marker to every encoded text (Llama-2, Llemma,
    Mistral: normalizer `Prepend("▁")`) would give a completion encoded on its own a spurious
    leading space the sampler never produced; such a completion is encoded after a line break
    and the line break's tokens are dropped, which gives the ids it has inside "...\\n" + text.
    """
    if not inserts_prefix_space(tokenizer):
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    anchor = list(tokenizer(_ANCHOR, add_special_tokens=False).input_ids)
    joined = list(tokenizer(_ANCHOR + text, add_special_tokens=False).input_ids)
    if joined[: len(anchor)] != anchor:
        raise ValueError(f"the tokenizer merges a line break with the text after it ({text[:20]!r}); cannot "
                         "encode a completion without the word-boundary space it prepends")
    return joined[len(anchor):]


def pad_right(sequences: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """A [N, max_len] long tensor of right-padded sequences."""
    width = max((len(s) for s in sequences), default=0)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


class LengthGroupedDistributedSampler(DistributedSampler):
    """Shuffled batches of similar length (less padding), whole batches per data-parallel rank.

    Per epoch (seed + epoch): shuffle, cut into mega-chunks of `mega_batches` batches, sort each
    chunk by length, cut into batches, shuffle the batch order. Rank r takes batches r, r+R, ...
    (R = num_replicas; batches are repeated to give every rank the same count, as
    DistributedSampler pads). The one short batch is always its rank's last, so a DataLoader with
    the same `batch_size` cuts exactly these batches. Being a DistributedSampler, Lightning
    neither replaces nor re-wraps it (`use_distributed_sampler` on or off) and calls `set_epoch`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, mega_batches: int = 50) -> None:
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"batch_size and mega_batches must be >= 1, got {batch_size}, {mega_batches}")
        if not lengths:
            raise ValueError("no examples to sample")
        super().__init__(list(lengths), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.mega = batch_size * mega_batches

    def _layout(self) -> tuple[int, int, int]:
        """(full batches, size of the short batch or 0, padding batches) — fixed per dataset."""
        full, short = divmod(len(self.lengths), self.batch_size)
        padding = -(full + (short > 0)) % self.num_replicas
        return full, short, padding

    def __len__(self) -> int:
        full, short, padding = self._layout()
        sizes = [self.batch_size] * full + [self.batch_size if full else short] * padding + [short] * (short > 0)
        return sum(sizes[self.rank::self.num_replicas])

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        batches: list[list[int]] = []
        for start in range(0, len(order), self.mega):
            chunk = sorted(order[start:start + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        full = [full[i] for i in torch.randperm(len(full), generator=g).tolist()]
        _, _, padding = self._layout()
        pool = full or short
        ordered = full + [pool[i % len(pool)] for i in range(padding)] + short
        for batch in ordered[self.rank::self.num_replicas]:
            yield from batch


def data_parallel_replicas(trainer) -> dict[str, int]:
    """Data-parallel world size and rank from the trainer's strategy (1, 0 without one)."""
    strategy = trainer.strategy if trainer is not None else None
    kwargs = getattr(strategy, "distributed_sampler_kwargs", None) if strategy is not None else None
    if not kwargs:
        return {"num_replicas": 1, "rank": 0}
    return {"num_replicas": int(kwargs["num_replicas"]), "rank": int(kwargs["rank"])}
