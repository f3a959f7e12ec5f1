"""Answer accuracy as a torchmetrics Metric, so it accumulates over batches and syncs
(sums) across DDP/FSDP processes before `compute`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class AnswerAccuracy(Metric):
    """Fraction of graded answers that were correct; 0.0 before any update."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, correct: Sequence[bool] | torch.Tensor) -> None:
        """Add a batch of grades: booleans (or 0/1 values), one per answer."""
        flags = torch.as_tensor(correct).reshape(-1)
        if flags.dtype != torch.bool:
            if not bool(((flags == 0) | (flags == 1)).all()):
                raise ValueError("AnswerAccuracy.update expects booleans or 0/1 values")
            flags = flags.bool()
        self.correct += flags.sum().to(self.correct.device)
        self.total += flags.numel()

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(0.0, device=self.total.device)
        return self.correct.float() / self.total
