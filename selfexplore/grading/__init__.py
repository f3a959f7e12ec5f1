"""Answer grading: extraction, equivalence (exact, numeric and symbolic), accuracy metric.

`AnswerAccuracy` is imported lazily: it needs torch, which the grading worker process
(see timeout.py) and plain grading scripts should not have to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from selfexplore.grading.equiv import is_equiv
from selfexplore.grading.extract import extract_answer

if TYPE_CHECKING:
    from selfexplore.grading.metric import AnswerAccuracy

#: Which grader graded a report: bump when a verdict on some answer pair changes.
#: math-3: adjacent boxes are one answer (docs/grading.md).
GRADER_VERSION = "math-3"

__all__ = ["GRADER_VERSION", "AnswerAccuracy", "extract_answer", "is_equiv"]


def __getattr__(name: str) -> Any:
    if name == "AnswerAccuracy":
        from selfexplore.grading.metric import AnswerAccuracy

        return AnswerAccuracy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
