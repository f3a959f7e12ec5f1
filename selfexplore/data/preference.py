"""Preference pairs (prompt / chosen / rejected JSONL) tokenized and batched for step-level DPO.

Prompt and completions are encoded separately (a step prompt ends mid-rationale, so BPE must
not merge across the boundary); the end token goes only on a side that ends the response,
the loss mask covers completion tokens only, and truncation cuts the prompt's start first.

Design notes: docs/design.md#preference-data
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from selfexplore.data.batching import (
    LengthGroupedDistributedSampler,
    data_parallel_replicas,
    encode_prompt_completion,
    pad_right,
)
from selfexplore.io import DataError, parse_record, require_str
from selfexplore.models import load_tokenizer
from selfexplore.models.chat import completion_end_id

FIELDS = ("prompt", "chosen", "rejected")
ENDS_FIELDS = ("chosen_ends", "rejected_ends")  # optional booleans, default true (see EOS above)

# What a pair that cannot be tokenized within the limits does: stop the run, or be skipped and counted.
OnInvalid = Literal["error", "skip"]
ON_INVALID: tuple[str, ...] = get_args(OnInvalid)


def truncate_pair(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int,
                  max_prompt_length: int, keep_prefix: int = 0
                  ) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Apply the module's truncation rule; returns (prompt, chosen, rejected, prompt_cut, completion_cut).

    `keep_prefix` leading prompt tokens (the tokenizer's BOS) survive left-truncation.
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    prompt_cut = completion_cut = False
    if len(prompt_ids) + longest > max_length and len(prompt_ids) > max_prompt_length:
        keep_end = max_prompt_length - keep_prefix
        prompt_ids = prompt_ids[:keep_prefix] + prompt_ids[len(prompt_ids) - keep_end:]
        prompt_cut = True
    budget = max_length - len(prompt_ids)
    if longest > budget:
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
        completion_cut = True
    return prompt_ids, chosen_ids, rejected_ids, prompt_cut, completion_cut


def special_prefix_length(tokenizer) -> int:
    """How many special tokens (BOS) the tokenizer puts before a text; rejects unusable tokenizers.

    Special tokens appended AFTER the text (EOS between prompt and completion) would silently
    corrupt the prompt/completion concatenation, so they are an error. A word-boundary space
    inserted before every encoded text (the legacy Llama / Mistral tokenizers) is not: completions
    are encoded without it (`selfexplore.data.batching.encode_continuation`).
    """
    probe = "12 + 7 = 19"
    full = list(tokenizer(probe).input_ids)
    plain = list(tokenizer(probe, add_special_tokens=False).input_ids)
    n = len(full) - len(plain)
    if n < 0 or full[n:] != plain:
        raise ValueError("the tokenizer adds special tokens after the text (e.g. add_eos_token=True); "
                         "a prompt must end exactly where its completion starts")
    return n


def _parse_line(raw: bytes, path: Path, line: int) -> tuple[str, str, str, bool, bool]:
    """One JSONL line -> (prompt, chosen, rejected, chosen_ends, rejected_ends); errors name file, line, field."""
    record = parse_record(raw, path, line)
    prompt, chosen, rejected = (require_str(record, f, path, line) for f in FIELDS)
    if chosen == rejected:
        raise DataError("identical to 'chosen': a pair must prefer one text over another", path, line, "rejected")
    ends = []
    for field in ENDS_FIELDS:
        value = record.get(field, True)
        if not isinstance(value, bool):
            raise DataError(f"expected true or false, got {value!r}", path, line, field)
        ends.append(value)
    return prompt, chosen, rejected, ends[0], ends[1]


class PreferenceDataset(Dataset):
    """Tokenized pairs; item i is a dict `index`, `prompt_ids`, `chosen_ids`, `rejected_ids`.

    `index` is the position in this dataset (stable for a given file and settings), so log-probs
    precomputed once per round (the reference model's) can be looked up per example; key such a
    cache with `fingerprint()`, which changes whenever the tokenized data does.
    """

    def __init__(self, examples: list[dict[str, Any]], stats: dict[str, int], source: str) -> None:
        self.examples = examples
        self.stats = stats
        self.source = source

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        """Padded row length of each pair (prompt + longer completion), for length grouping."""
        return [len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in self.examples]

    def fingerprint(self) -> str:
        """sha256 of the token ids of every pair, in order."""
        h = hashlib.sha256()
        for e in self.examples:
            h.update(json.dumps([e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]]).encode())
        return h.hexdigest()

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, max_length: int = 384, max_prompt_length: int = 256,
                   eos: bool = True, on_invalid: OnInvalid = "error") -> PreferenceDataset:
        """Read and tokenize a pairs file (ours or TRL-style; fields other than `FIELDS` and
        `ENDS_FIELDS`, such as `meta`, are ignored).

        Invalid records raise DataError (`on_invalid="error"`) or are counted and skipped. Pairs
        whose two sides become identical after truncation are always skipped and counted.
        """
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        path = Path(path)
        if not path.is_file():
            raise DataError("file not found", path)
        keep_prefix = special_prefix_length(tokenizer)
        end_id = completion_end_id(tokenizer) if eos else None
        if not keep_prefix < max_prompt_length < max_length:
            raise ValueError(f"need {keep_prefix} (special prefix) < max_prompt_length ({max_prompt_length}) "
                             f"< max_length ({max_length})")
        stats = dict.fromkeys(("records", "used", "skipped_invalid", "skipped_identical_after_truncation",
                               "prompt_truncated", "completion_truncated"), 0)
        examples: list[dict[str, Any]] = []
        first_error: DataError | None = None
        with path.open("rb") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                stats["records"] += 1
                try:
                    prompt, chosen, rejected, chosen_ends, rejected_ends = _parse_line(raw, path, line)
                except DataError as e:
                    if on_invalid == "error":
                        raise
                    stats["skipped_invalid"] += 1
                    first_error = first_error or e
                    continue
                p_ids, c_ids = encode_prompt_completion(tokenizer, prompt, chosen, end_id if chosen_ends else None)
                _, r_ids = encode_prompt_completion(tokenizer, prompt, rejected, end_id if rejected_ends else None)
                p_ids, c_ids, r_ids, p_cut, c_cut = truncate_pair(p_ids, c_ids, r_ids, max_length,
                                                                  max_prompt_length, keep_prefix)
                if c_ids == r_ids:
                    stats["skipped_identical_after_truncation"] += 1
                    continue
                stats["prompt_truncated"] += p_cut
                stats["completion_truncated"] += c_cut
                examples.append({"index": len(examples), "prompt_ids": p_ids, "chosen_ids": c_ids,
                                 "rejected_ids": r_ids})
        stats["used"] = len(examples)
        if first_error is not None:
            rank_zero_warn(f"skipped {stats['skipped_invalid']} invalid record(s) in {path}; first: {first_error}")
        if stats["skipped_identical_after_truncation"]:
            rank_zero_warn(f"skipped {stats['skipped_identical_after_truncation']} pair(s) in {path} whose chosen "
                           f"and rejected are identical after truncation to max_length={max_length}")
        if not examples:
            raise DataError(f"no usable preference pairs ({stats})", path)
        return cls(examples, stats, str(path))


class PreferenceCollator:
    """Pads a list of dataset items into one batch for a single chosen+rejected forward.

    Keys (B pairs, L = longest row): `input_ids` [2B, L] long (rows 0..B-1 chosen, B..2B-1
    rejected, right-padded with `pad_id`), `attention_mask` [2B, L] long, `loss_mask` [2B, L]
    bool (completion + EOS tokens), `prompt_lengths` [2B] long, `index` [B] long (dataset index).
    Use `input_ids` as labels with `loss_mask` (see `training.losses.sequence_logps`).
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompts = [it["prompt_ids"] for it in items] * 2
        completions = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        rows = [p + c for p, c in zip(prompts, completions)]
        return {
            "input_ids": pad_right(rows, self.pad_id),
            "attention_mask": pad_right([[1] * len(r) for r in rows], 0),
            "loss_mask": pad_right([[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)], 0).bool(),
            "prompt_lengths": torch.tensor([len(p) for p in prompts], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        }


class PreferenceDataModule(LightningDataModule):
    """Preference pairs for step-level (or outcome) DPO; see the module docstring for the rules.

    Args:
        train_path / val_path: pairs JSONL (`prompt`, `chosen`, `rejected`; other fields ignored).
            Changing them (e.g. between Self-Explore rounds) and calling `setup` again re-reads.
        tokenizer_path: tokenizer folder; by default the LightningModule's `tokenizer`.
        max_length / max_prompt_length: token budgets (paper: 384 GSM8K; 1024 / 512 MATH).
        batch_size: pairs per batch (the forward sees 2x rows).
        eos: append the end token (EOS or the chat end-of-turn) to each side that ends the
            response (all, unless a record says `chosen_ends` / `rejected_ends` false).
        on_invalid: 'error' stops at the first bad record; 'skip' counts it in `stats`.
        length_grouped: batch pairs of similar length (seeded; DDP-aware, see
            `LengthGroupedDistributedSampler`); else a plain seeded shuffle.
    After `setup`, `stats` maps 'train' / 'val' to the counts of read, used, skipped and
    truncated records (log them); `collate` is the batch collator (for reference precompute).
    """

    def __init__(
        self,
        train_path: str,
        val_path: str | None = None,
        tokenizer_path: str | None = None,
        max_length: int = 384,
        max_prompt_length: int = 256,
        batch_size: int = 8,
        eos: bool = True,
        on_invalid: OnInvalid = "error",
        num_workers: int = 0,
        seed: int = 0,
        length_grouped: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid must be 'error' or 'skip', got {on_invalid!r}")
        self.train_path = train_path
        self.val_path = val_path
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.batch_size = batch_size
        self.eos = eos
        self.on_invalid = on_invalid
        self.num_workers = num_workers
        self.seed = seed
        self.length_grouped = length_grouped
        self.train_dataset: PreferenceDataset | None = None
        self.val_dataset: PreferenceDataset | None = None
        self.collate: PreferenceCollator | None = None
        self.stats: dict[str, dict[str, int]] = {}
        self._built: dict[str, str | None] = {}


    def set_train_path(self, train_path: str) -> None:
        """Train on another pairs file from the next `fit` on (the next Self-Explore round's)."""
        self.train_path = train_path
    def _tokenizer(self):
        if self.tokenizer_path:
            return load_tokenizer(self.tokenizer_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is None:
            raise ValueError("PreferenceDataModule needs tokenizer_path when its LightningModule has no tokenizer")
        return module.tokenizer

    def _load(self, split: str, path: str, tokenizer) -> PreferenceDataset:
        dataset = PreferenceDataset.from_jsonl(path, tokenizer, self.max_length, self.max_prompt_length,
                                               self.eos, self.on_invalid)
        self.stats[split] = dataset.stats
        self._built[split] = path
        rank_zero_info(f"preference data ({split}, {path}): {dataset.stats}")
        return dataset

    def setup(self, stage: str) -> None:
        need_train = stage == "fit" and self._built.get("train") != self.train_path
        need_val = stage in ("fit", "validate") and self.val_path and self._built.get("val") != self.val_path
        if not (need_train or need_val):
            return
        tokenizer = self._tokenizer()
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
        self.collate = PreferenceCollator(pad_id)
        if need_train:
            self.train_dataset = self._load("train", self.train_path, tokenizer)
        if need_val:
            self.val_dataset = self._load("val", self.val_path, tokenizer)

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise RuntimeError("call setup('fit') first")
        common = {"batch_size": self.batch_size, "collate_fn": self.collate, "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0}
        if not self.length_grouped:
            g = torch.Generator().manual_seed(self.seed)
            return DataLoader(self.train_dataset, shuffle=True, generator=g, **common)
        sampler = LengthGroupedDistributedSampler(self.train_dataset.lengths, self.batch_size,
                                                  seed=self.seed, **data_parallel_replicas(self.trainer))
        return DataLoader(self.train_dataset, sampler=sampler, **common)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
