"""The Task contract every stage relies on: load problems, build prompts, split, grade."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    """One question with its gold rationale (`solution`, ending 'The answer is ...') and answer."""

    id: str
    question: str
    solution: str
    answer: str


class Task(abc.ABC):
    """A benchmark: where problems come from and how text about them is split and graded."""

    name: str = ""

    @abc.abstractmethod
    def load(self, split: str, path: str | Path | None = None) -> list[Problem]:
        """Problems of a split ('train', 'validation', 'test'), or of a JSONL file at `path`."""

    def prompt(self, problem: Problem) -> str:
        """The paper's zero-shot prompt: the stripped question followed by a newline."""
        return problem.question.strip() + "\n"

    @abc.abstractmethod
    def split_steps(self, text: str) -> list[str]:
        """A rationale as a list of steps (the unit of first-pit search)."""

    @abc.abstractmethod
    def extract_answer(self, text: str) -> str | None:
        """The final answer stated in a rationale, or None."""

    @abc.abstractmethod
    def is_correct(self, text: str, gold: str) -> bool:
        """Whether a rationale's final answer is equivalent to the gold answer."""
