"""Entry points for a pipeline unit: train a verifier on a round's prm.jsonl, and score samples for
the selectors. Paths and configs in, files and metrics out; nothing here knows the run's layout.

    out_dir/base/              the policy with the step tag added (`prepare_verifier_base`)
    out_dir/{train,val}.jsonl  prm rows split by question (held-out questions: val)
    out_dir/verifier/          the trained verifier (HF folder; `StepVerifierModule.export`)
    out_dir/metrics.json       held-out metrics of the verifier and of the flag-the-last-step baseline
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfexplore.io import read_jsonl, write_json, write_jsonl
from selfexplore.models import LoraSpec, ModelSpec
from selfexplore.prm.metrics import evaluate_scores
from selfexplore.prm.rows import split_by_question
from selfexplore.prm.selectors import Candidate, group_answers
from selfexplore.prm.tagging import prepare_verifier_base
from selfexplore.prm.verifier import LabelMode, Overlong
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.validation import raise_problems

if TYPE_CHECKING:
    from selfexplore.tasks.base import Task


@dataclass
class VerifierConfig:
    """How a round's verifier is trained (`run_verifier_unit`).

    labels: "process" (every step's label: the step verifier) or "outcome" (final-answer labels only:
      the outcome verifier to compare against).
    val_fraction: share of questions held out for the metrics (whole questions; see `split_by_question`).
    max_length, overlong: tokens per row at most; longer rows are skipped and counted, or refused.
    batch_size, epochs: training loop size.
    threshold: P(good) under which a step counts as flagged.
    lora: train a LoRA adapter instead of every weight (in the pipeline: the run's own LoRA settings when unset).
    optimizer, scheduler: as for the other stages.
    seed: the split's and the loader's seed.
    """

    labels: LabelMode = "process"
    val_fraction: float = 0.1
    max_length: int = 512
    overlong: Overlong = "skip"
    batch_size: int = 8
    epochs: int = 2
    threshold: float = 0.5
    lora: LoraSpec | None = None
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    seed: int = 0

    def problems(self, prefix: str = "verifier") -> list[str]:
        """Every invalid value, named `prefix.field`."""
        problems = self.optimizer.problems(f"{prefix}.optimizer") + self.scheduler.problems(f"{prefix}.scheduler")
        if self.labels not in ("process", "outcome"):
            problems.append(f"{prefix}.labels must be 'process' or 'outcome', got {self.labels!r}")
        if self.overlong not in ("skip", "error"):
            problems.append(f"{prefix}.overlong must be 'skip' or 'error', got {self.overlong!r}")
        if not 0 < self.val_fraction < 1:
            problems.append(f"{prefix}.val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if min(self.max_length, self.batch_size, self.epochs) < 1:
            problems.append(f"{prefix}: max_length, batch_size and epochs must be >= 1")
        if not 0 < self.threshold < 1:
            problems.append(f"{prefix}.threshold must be in (0, 1), got {self.threshold!r}")
        return problems


def flag_last_scores(rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """The baseline scorer that calls every step good but the last (P(good) 1 or 0)."""
    return [[1.0] * (len(r["completions"]) - 1) + [0.0] for r in rows]


def run_verifier_unit(policy: str | os.PathLike, prm_path: str | os.PathLike, out_dir: str | os.PathLike,
                      config: VerifierConfig | None = None, trainer: Mapping[str, Any] | None = None,
                      model: ModelSpec | None = None) -> dict[str, Any]:
    """Train a verifier from `policy` (an HF folder) on `prm_path` and write `out_dir` (module docstring).

    `model`: how to load it, as the run loads its policies (dtype, 4-bit base, LoRA, checkpointing;
    `config.lora`, when set, replaces the LoRA settings); by default whole weights in fp32.

    `trainer`: Lightning `Trainer` arguments (accelerator, devices, strategy, precision, logger ...);
    `max_epochs` comes from the config. Returns the held-out metrics (also in metrics.json).
    """
    from lightning.pytorch import Trainer, seed_everything

    from selfexplore.prm.verifier import PRMDataModule, StepVerifierModule

    config = config or VerifierConfig()
    raise_problems(config.problems(), "verifier config")
    out = Path(out_dir)
    train_rows, val_rows = split_by_question(read_jsonl(prm_path), config.val_fraction, config.seed)
    if not train_rows or not val_rows:
        raise ValueError(f"{prm_path}: {len(train_rows)} train and {len(val_rows)} held-out rows; both need some "
                         "(more questions, or another val_fraction)")
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "val.jsonl", val_rows)
    base = prepare_verifier_base(policy, out / "base")
    seed_everything(config.seed)
    spec = ModelSpec(path=str(base), lora=config.lora) if model is None else \
        replace(model, path=str(base), adapter_path=None, lora=config.lora or model.lora)
    module = StepVerifierModule(spec, optimizer=config.optimizer,
                                scheduler=config.scheduler, threshold=config.threshold,
                                export_dir=str(out / "verifier"))
    data = PRMDataModule(str(out / "train.jsonl"), str(out / "val.jsonl"), max_length=config.max_length,
                         labels=config.labels, overlong=config.overlong, batch_size=config.batch_size,
                         seed=config.seed)
    defaults = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "num_sanity_val_steps": 0}
    fit = Trainer(**{**defaults, **(trainer or {}), "max_epochs": config.epochs})
    fit.fit(module, data)
    metrics = {k.removeprefix("val/"): float(v) for k, v in fit.validate(module, data, verbose=False)[0].items()}
    held = read_jsonl(out / "val.jsonl")
    result = {"verifier": metrics, "flag_last_baseline": evaluate_scores(flag_last_scores(held),
                                                                          [r["labels"] for r in held], 0.5),
              "labels": config.labels, "data": data.stats}
    write_json(out / "metrics.json", result)
    return result


def candidates(samples: Sequence[Mapping[str, Any]], task: Task,
               score: Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[float]]] | None = None,
               same: Callable[[str, str], bool] | None = None) -> list[list[Candidate]]:
    """Graded samples (samples.jsonl schema) -> per question (in order of first sight) its `Candidate`s,
    with `score(prompts, steps)`'s step scores (a verifier's or the implicit reward's `score`) and
    answers grouped by `same` (e.g. the task's equivalence) so that equal answers vote together."""
    by_question: dict[str, list[Mapping[str, Any]]] = {}
    for s in samples:
        by_question.setdefault(s["question_id"], []).append(s)
    out = []
    for group in by_question.values():
        steps = [task.split_steps(s["completion"]) for s in group]
        scored = [i for i, st in enumerate(steps) if st]
        step_scores = [[] for _ in group]
        if score is not None and scored:
            for i, sc in zip(scored, score([group[i]["prompt"] for i in scored], [steps[i] for i in scored])):
                step_scores[i] = sc
        answers = [task.extract_answer(s["completion"]) for s in group]
        if same is not None:
            answers = group_answers(answers, same)
        out.append([Candidate(a, bool(s["correct"]), tuple(sc)) for a, s, sc in zip(answers, group, step_scores)])
    return out
