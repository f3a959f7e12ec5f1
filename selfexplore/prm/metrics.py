"""Verifier metrics, torchmetrics `Metric`s that sync across processes.

Step labels are mostly positive (every step before a pit is good), so plain accuracy rewards a
scorer that calls everything good: `StepMetrics` reports step AUROC, balanced accuracy and the
negative-class F1 instead. `FirstErrorMetrics` is ProcessBench's: on a rationale with an error,
is the first step flagged bad the first error (`acc_err`); on a correct one, is no step flagged
(`acc_cor`); F1 is their harmonic mean. A step is flagged when its score is below `threshold`
(scores are P(good) for a verifier, beta * log-ratio for the implicit reward).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc, binary_f1_score, multiclass_accuracy


def first_flagged(scores: Sequence[float] | torch.Tensor, threshold: float) -> int:
    """0-based index of the first step scored below `threshold`, -1 when none is."""
    flagged = (torch.as_tensor(scores) < threshold).nonzero()
    return int(flagged[0]) if len(flagged) else -1


def first_error(labels: Sequence[bool] | torch.Tensor) -> int:
    """0-based index of the first False label, -1 for an all-true row."""
    bad = (~torch.as_tensor(labels, dtype=torch.bool)).nonzero()
    return int(bad[0]) if len(bad) else -1


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


class StepMetrics(Metric):
    """Step AUROC (score against label), balanced accuracy and negative-class F1 (at `threshold`)."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores.append(scores.detach().float().flatten())
        self.labels.append(labels.detach().bool().flatten())

    def compute(self) -> dict[str, torch.Tensor]:
        scores = torch.cat(self.scores) if isinstance(self.scores, list) else self.scores
        labels = (torch.cat(self.labels) if isinstance(self.labels, list) else self.labels).long()
        good = (scores >= self.threshold).long()
        auroc = binary_auroc(scores, labels) if 0 < labels.sum() < len(labels) else torch.tensor(float("nan"))
        return {"auroc": auroc,
                "balanced_accuracy": multiclass_accuracy(good, labels, num_classes=2, average="macro"),
                "negative_f1": binary_f1_score(1 - good, 1 - labels)}


class FirstErrorMetrics(Metric):
    """ProcessBench's first-error identification: acc_err, acc_cor and their harmonic mean (f1)."""

    full_state_update = False

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = threshold
        for name in ("err_total", "err_hit", "cor_total", "cor_hit"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, row_scores: Sequence[torch.Tensor], row_labels: Sequence[torch.Tensor]) -> None:
        """One score tensor and one label tensor per rationale."""
        for scores, labels in zip(row_scores, row_labels, strict=True):
            truth, flagged = first_error(labels), first_flagged(scores, self.threshold)
            if truth < 0:
                self.cor_total += 1
                self.cor_hit += int(flagged < 0)
            else:
                self.err_total += 1
                self.err_hit += int(flagged == truth)

    def compute(self) -> dict[str, torch.Tensor]:
        acc_err = self.err_hit / self.err_total.clamp_min(1)
        acc_cor = self.cor_hit / self.cor_total.clamp_min(1)
        return {"acc_err": acc_err.float(), "acc_cor": acc_cor.float(),
                "f1": torch.tensor(harmonic_mean(float(acc_err), float(acc_cor)))}


def evaluate_scores(row_scores: Sequence[Sequence[float]], row_labels: Sequence[Sequence[bool]],
                    threshold: float) -> dict[str, float]:
    """Every metric of this module for any scorer's per-step scores (a verifier's, the implicit
    reward's, a baseline's) against prm.jsonl labels, as plain floats."""
    steps, first = StepMetrics(threshold), FirstErrorMetrics(threshold)
    scores = [torch.as_tensor(s, dtype=torch.float) for s in row_scores]
    labels = [torch.as_tensor(x, dtype=torch.bool) for x in row_labels]
    steps.update(torch.cat(scores), torch.cat(labels))
    first.update(scores, labels)
    return {k: float(v) for k, v in {**steps.compute(), **first.compute()}.items()}
