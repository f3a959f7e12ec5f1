"""A step verifier trained on prm.jsonl: a causal LM read at one added tag after each step.

The score of a step is sigmoid(logit["+"] - logit["-"]) at its tag (Math-Shepherd's reading), so
the verifier is an ordinary causal LM: every `ModelSpec` option (full, LoRA, QLoRA), FSDP2 and the
HF export work as for the policy (`PolicyModule`). Its base must hold the tag
(`selfexplore.prm.tagging.prepare_verifier_base`). `labels="outcome"` trains the same model on
final-answer labels only (the loss on the last tag of each row: an outcome verifier to compare
against); validation always scores every step against its label, so both variants are measured
on the same labels. Maths in pure functions (`tag_logits`, `tag_loss`, `split_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from selfexplore.data.batching import pad_right
from selfexplore.io import DataError, iter_jsonl, require_str
from selfexplore.models import ModelSpec, load_tokenizer
from selfexplore.prm.metrics import FirstErrorMetrics, StepMetrics
from selfexplore.prm.tagging import TagError, encode_steps, score_ids, tag_id
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.training.policy import PolicyModule

LabelMode = Literal["process", "outcome"]
Overlong = Literal["skip", "error"]


def check_row(rec: dict[str, Any], path: Path, line: int) -> tuple[str, list[str], list[bool]]:
    """(prompt, steps, labels) of a prm.jsonl row; labels must be real booleans (TRL's `int()` cast
    turns soft labels into 0, and a -100 read as bool becomes True), one per step."""
    prompt = require_str(rec, "prompt", path, line)
    steps, labels = rec.get("completions"), rec.get("labels")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s.strip() for s in steps):
        raise DataError("expected a non-empty list of non-empty strings", path, line, "completions")
    if not isinstance(labels, list) or not all(isinstance(x, bool) for x in labels):
        raise DataError(f"expected a list of true/false, got {labels!r}", path, line, "labels")
    if len(labels) != len(steps):
        raise DataError(f"{len(labels)} labels for {len(steps)} steps", path, line, "labels")
    return prompt, steps, labels


class StepLabelDataset(Dataset):
    """Tokenized rows: item i is `ids`, `positions` (one tag per step), `labels` (bools), `train_mask`
    (which labels the loss reads: all, or the last one for `labels="outcome"`)."""

    def __init__(self, examples: list[dict[str, Any]], stats: dict[str, int]) -> None:
        self.examples, self.stats = examples, stats

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.examples[i]

    @classmethod
    def from_jsonl(cls, path: str | Path, tokenizer, max_length: int = 512, labels: LabelMode = "process",
                   overlong: Overlong = "skip") -> StepLabelDataset:
        """Read and tokenize prm.jsonl (ours or any TRL stepwise-supervision file).

        A row longer than `max_length` is never cut (that drops tags): it is counted and skipped,
        or refused with `overlong="error"`. A row whose text holds the tag is refused.
        """
        path = Path(path)
        tag = tag_id(tokenizer)
        stats = dict.fromkeys(("records", "used", "skipped_overlong", "steps", "negative_steps"), 0)
        examples = []
        for line, rec in iter_jsonl(path):
            stats["records"] += 1
            prompt, steps, row_labels = check_row(rec, path, line)
            try:
                ids, positions = encode_steps(tokenizer, prompt, steps, tag)
            except TagError as e:
                raise DataError(str(e), path, line, "completions") from None
            if len(ids) > max_length:
                if overlong == "error":
                    raise DataError(f"{len(ids)} tokens, over max_length={max_length} (a row is never cut: that "
                                    "would drop its tags); raise max_length or use overlong='skip'", path, line)
                stats["skipped_overlong"] += 1
                continue
            train = [True] * len(steps) if labels == "process" else [False] * (len(steps) - 1) + [True]
            examples.append({"ids": ids, "positions": positions, "labels": row_labels, "train_mask": train})
            stats["steps"] += len(steps)
            stats["negative_steps"] += row_labels.count(False)
        stats["used"] = len(examples)
        if stats["skipped_overlong"]:
            rank_zero_warn(f"{path}: skipped {stats['skipped_overlong']} of {stats['records']} rows longer than "
                           f"max_length={max_length} tokens (never cut: that would drop tags)")
        if not examples:
            raise DataError(f"no usable rows ({stats})", path)
        return cls(examples, stats)


class StepLabelCollator:
    """Right-padded batch: `input_ids`, `attention_mask` [B, L]; `tag_mask` [B, L] bool (a step's tag);
    `targets` [B, L] float (1.0 good, 0.0 bad, 0 where no tag); `train_mask` [B, L] bool (tags the loss
    reads). Labels stay separate from the mask, so no sentinel value can be read as a label."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = pad_right([it["ids"] for it in items], self.pad_id)
        shape = ids.shape
        tag_mask = torch.zeros(shape, dtype=torch.bool)
        train_mask = torch.zeros(shape, dtype=torch.bool)
        targets = torch.zeros(shape)
        for b, it in enumerate(items):
            pos = torch.tensor(it["positions"])
            tag_mask[b, pos] = True
            train_mask[b, pos] = torch.tensor(it["train_mask"])
            targets[b, pos] = torch.tensor(it["labels"], dtype=torch.float)
        return {"input_ids": ids, "attention_mask": pad_right([[1] * len(it["ids"]) for it in items], 0),
                "tag_mask": tag_mask, "train_mask": train_mask, "targets": targets}


class PRMDataModule(LightningDataModule):
    """prm.jsonl for a step (or outcome) verifier.

    Args:
        train_path / val_path: prm.jsonl files (TRL's `prompt`, `completions`, `labels`; other fields ignored).
        tokenizer_path: a tokenizer holding the step tag; by default the LightningModule's.
        max_length: tokens per row at most (rows are never cut; see `overlong`).
        labels: "process" (every step's label) or "outcome" (the last label only) for training.
        overlong: "skip" (counted, warned) or "error" for rows over `max_length`.
        batch_size, num_workers, seed: loader settings (seeded shuffle).
    """

    def __init__(self, train_path: str, val_path: str | None = None, tokenizer_path: str | None = None,
                 max_length: int = 512, labels: LabelMode = "process", overlong: Overlong = "skip",
                 batch_size: int = 8, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if labels not in ("process", "outcome") or overlong not in ("skip", "error"):
            raise ValueError(f"labels must be 'process' or 'outcome' and overlong 'skip' or 'error', "
                             f"got {labels!r}, {overlong!r}")
        if batch_size < 1 or max_length < 2:
            raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
        self.train_path, self.val_path, self.tokenizer_path = train_path, val_path, tokenizer_path
        self.max_length, self.labels, self.overlong = max_length, labels, overlong
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.train_dataset: StepLabelDataset | None = None
        self.val_dataset: StepLabelDataset | None = None
        self.collate: StepLabelCollator | None = None
        self.stats: dict[str, dict[str, int]] = {}

    def _tokenizer(self):
        if self.tokenizer_path:
            return load_tokenizer(self.tokenizer_path)
        module = self.trainer.lightning_module if self.trainer is not None else None
        if getattr(module, "tokenizer", None) is None:
            raise ValueError("PRMDataModule needs tokenizer_path when its LightningModule has no tokenizer")
        return module.tokenizer

    def setup(self, stage: str) -> None:
        tokenizer = self._tokenizer()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.collate = StepLabelCollator(pad)
        if stage == "fit" and self.train_dataset is None:
            self.train_dataset = StepLabelDataset.from_jsonl(self.train_path, tokenizer, self.max_length,
                                                             self.labels, self.overlong)
            self.stats["train"] = self.train_dataset.stats
        if stage in ("fit", "validate") and self.val_path and self.val_dataset is None:
            self.val_dataset = StepLabelDataset.from_jsonl(self.val_path, tokenizer, self.max_length,
                                                           "process", self.overlong)
            self.stats["val"] = self.val_dataset.stats
        rank_zero_info(f"prm data: {self.stats}")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_dataset, batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_dataset is None:
            return []
        return DataLoader(self.val_dataset, batch_size=self.batch_size, collate_fn=self.collate,
                          num_workers=self.num_workers)


def tag_logits(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               tag_mask: torch.Tensor, good: int, bad: int) -> torch.Tensor:
    """[B, L] logit of "good" at every tag (logit[+] - logit[-]); 0 where there is no tag. The LM head
    runs only at positions where some row has a tag (`logits_to_keep`), not over the whole sequence."""
    keep = tag_mask.any(0).nonzero().squeeze(-1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=keep).logits
    out = torch.zeros(tag_mask.shape, dtype=torch.float32, device=logits.device)
    out[:, keep] = (logits[..., good] - logits[..., bad]).float()
    return out * tag_mask


def tag_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the masked tags."""
    return F.binary_cross_entropy_with_logits(logits[mask], targets[mask])


def split_rows(values: torch.Tensor, tag_mask: torch.Tensor) -> list[torch.Tensor]:
    """Per row, its values at its tags, in step order."""
    return [v[m] for v, m in zip(values, tag_mask)]


class StepVerifierModule(PolicyModule):
    """Trains a causal LM to score steps at their tags (see the module docstring).

    Args (beyond `PolicyModule`'s model, optimizer, scheduler, export): threshold: P(good) under which a
    step counts as flagged bad (balanced accuracy, negative-class F1, first-error metrics).
    """

    def __init__(self, model: ModelSpec, optimizer: OptimizerConfig | None = None,
                 scheduler: SchedulerConfig | None = None, threshold: float = 0.5, export_dir: str | None = None,
                 export_merged: bool = True) -> None:
        super().__init__(model, None, optimizer, scheduler, export_dir, export_merged)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.save_hyperparameters()
        self.threshold = threshold
        self.val_steps = StepMetrics(threshold)
        self.val_first_error = FirstErrorMetrics(threshold)

    def configure_model(self) -> None:
        tag_id(self.tokenizer)  # fail before loading weights when the base lacks the tag
        self.good_bad = score_ids(self.tokenizer)
        super().configure_model()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return tag_logits(self.policy, batch["input_ids"], batch["attention_mask"], batch["tag_mask"], *self.good_bad)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = tag_loss(self(batch), batch["targets"], batch["train_mask"])
        self.log("train/loss", loss, prog_bar=True)
        self.log_throughput(int(batch["attention_mask"].sum()))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch)
        self.log("val/loss", tag_loss(logits, batch["targets"], batch["tag_mask"]), sync_dist=True)
        scores = torch.sigmoid(logits)
        self.val_steps.update(scores[batch["tag_mask"]], batch["targets"][batch["tag_mask"]])
        self.val_first_error.update(split_rows(scores, batch["tag_mask"]),
                                    split_rows(batch["targets"].bool(), batch["tag_mask"]))

    def on_validation_epoch_end(self) -> None:
        for metrics in (self.val_steps, self.val_first_error):
            self.log_dict({f"val/{k}": v for k, v in metrics.compute().items()})
            metrics.reset()

    @torch.no_grad()
    def score(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], batch_size: int = 16
              ) -> list[list[float]]:
        """P(good) of every step of each (prompt, steps) rationale, tokenized as in training."""
        was_training = self.policy.training
        self.policy.eval()
        tag, collate = tag_id(self.tokenizer), StepLabelCollator(self.tokenizer.pad_token_id or 0)
        out: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            items = []
            for prompt, row in zip(prompts[start:start + batch_size], steps[start:start + batch_size]):
                ids, positions = encode_steps(self.tokenizer, prompt, row, tag)
                items.append({"ids": ids, "positions": positions, "labels": [True] * len(row),
                              "train_mask": [True] * len(row)})
            batch = {k: v.to(self.device) for k, v in collate(items).items()}
            out.extend(s.tolist() for s in split_rows(torch.sigmoid(self(batch)), batch["tag_mask"]))
        self.policy.train(was_training)
        return out


def load_verifier(path: str | Path) -> StepVerifierModule:
    """A trained verifier folder (`StepVerifierModule.export`), built for scoring (`score`)."""
    module = StepVerifierModule(ModelSpec(path=str(path)))
    module.configure_model()
    return module
