"""Tasks: where problems come from and how rationales are split and graded.

`get_task("gsm8k" | "math" | "arith", **options)` builds one; see each class for its options.
"""

from __future__ import annotations

import inspect
from typing import Any

from selfexplore.tasks.arith import ArithTask
from selfexplore.tasks.base import JsonlTask, LoadStats, Problem, Task
from selfexplore.tasks.gsm8k import GSM8KTask
from selfexplore.tasks.math_task import MathTask

TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (GSM8KTask, MathTask, ArithTask)}


def get_task(name: str, **options: Any) -> Task:
    """The task registered as `name`, built with `options` (unknown names/options raise)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    accepted = set(inspect.signature(cls).parameters)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; its options: "
                         f"{sorted(accepted)}")
    return cls(**options)


__all__ = ["TASKS", "ArithTask", "GSM8KTask", "JsonlTask", "LoadStats", "MathTask", "Problem",
           "Task", "get_task"]
