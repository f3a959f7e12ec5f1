"""Paired comparison of two policies evaluated on the same questions (what changed, and is it noise).

Two accuracies on one test split differ by a few points from noise alone; what a stage did is
clearer as the questions it fixed and the ones it broke relative to the policy it started from.
The exact McNemar test asks whether fixed and broken differ by more than a fair coin would
(under "no effect" each changed question is equally likely to go either way).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from selfexplore.io import DataError, iter_jsonl


@dataclass(frozen=True)
class PairedChange:
    """fixed: right now, wrong before; broken: the reverse; p_value: exact two-sided McNemar."""

    fixed: int
    broken: int
    p_value: float

    def __str__(self) -> str:
        return f"+{self.fixed} -{self.broken} (p={self.p_value:.2g})"


def mcnemar_exact_p(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | Binomial(n, 1/2))."""
    if fixed < 0 or broken < 0:
        raise ValueError(f"counts must be >= 0, got {fixed}, {broken}")
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1))
    return min(1.0, 2 * tail / 2**n)


def paired_change(before: Mapping[str, bool], after: Mapping[str, bool]) -> PairedChange:
    """Fixed / broken counts over the questions both evaluations graded, and their p-value."""
    shared = before.keys() & after.keys()
    fixed = sum(1 for q in shared if after[q] and not before[q])
    broken = sum(1 for q in shared if before[q] and not after[q])
    return PairedChange(fixed, broken, mcnemar_exact_p(fixed, broken))


def correct_by_question(path: str | Path) -> dict[str, bool]:
    """question_id -> correct, from a greedy evaluation file (one graded answer per question)."""
    out: dict[str, bool] = {}
    for line, record in iter_jsonl(path):
        for key in ("question_id", "correct"):
            if key not in record:
                raise DataError("missing", path, line, key)
        if not isinstance(record["correct"], bool):
            raise DataError(f"must be true or false, got {record['correct']!r}", path, line, "correct")
        if record["question_id"] in out:
            raise DataError(f"a second answer to {record['question_id']!r} (greedy evaluation has one)",
                            path, line, "question_id")
        out[record["question_id"]] = record["correct"]
    return out
