"""The Task contract every stage relies on: load problems, build prompts, split, grade.

`JsonlTask` holds what file-backed tasks share: reading a JSONL file of question/rationale
records with errors that name file, line and field, an optional lenient mode that skips bad
records and counts them (`task.last_load_stats`), and stable problem ids.
"""

from __future__ import annotations

import abc
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfexplore.grading import extract_answer, is_equiv
from selfexplore.io import DataError, parse_record, require_str

logger = logging.getLogger(__name__)

ANSWER_PREFIX = "The answer is"
# A final line already in trained form: "The answer is 42", "The answer is: 42.", ...
ANSWER_LINE = re.compile(r"\s*The answer is:?\s*(.*?)\s*\.?\s*")


@dataclass(frozen=True)
class Problem:
    """One question with its gold rationale (`solution`, ending 'The answer is ...') and answer."""

    id: str
    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class LoadStats:
    """What the last `load` produced: its source, the problems kept, and why records were skipped.

    `skipped` holds one located message per skipped record (only lenient loading skips).
    """

    source: str
    loaded: int
    skipped: tuple[str, ...] = ()

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)


class Task(abc.ABC):
    """A benchmark: where problems come from and how text about them is split and graded."""

    name: str = ""
    last_load_stats: LoadStats | None = None

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

    def same_answer(self, a: str, b: str) -> bool:
        """Whether two extracted answers are the same answer (votes over samples count them together)."""
        return a == b

    def first_wrong_step(self, problem: Problem, steps: list[str]) -> int | None:
        """The 1-based step where a rationale first departs from the problem's gold rationale.

        Only a task whose rationales are canonical (each step can be written one way, as in the
        generated `arith` problems) can tell; the default, for free-form rationales (GSM8K,
        MATH), is None. It lets a run measure how often the first pit is the first wrong step.
        """
        return None


def split_lines(text: str) -> list[str]:
    """GSM8K-style steps: one step per non-empty line (lines are kept as written)."""
    return [line for line in text.split("\n") if line.strip()]


class JsonlTask(Task):
    """A task read from JSONL files with a question field and a gold-rationale field.

    `layouts` lists the accepted (question field, rationale field) pairs, tried in order; the
    first whose question field is present in a record is used. A field `id` (string or
    integer), when present, is the problem id; otherwise the id is `"<file stem>:<line>"`.
    Strict loading (the default) raises `DataError` on the first bad record; `lenient=True`
    skips bad records, logs a warning and lists them in `last_load_stats.skipped`.
    """

    layouts: tuple[tuple[str, str], ...] = ()
    #: How answers are extracted and compared (`selfexplore.grading`): "gsm8k" or "math".
    grading_task: str = "gsm8k"

    def __init__(self, lenient: bool = False) -> None:
        self.lenient = lenient
        self.last_load_stats = None

    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text, task=self.grading_task)

    def is_correct(self, text: str, gold: str) -> bool:
        pred = self.extract_answer(text)
        return pred is not None and is_equiv(pred, gold, task=self.grading_task)

    def same_answer(self, a: str, b: str) -> bool:
        return is_equiv(a, b, task=self.grading_task)

    @abc.abstractmethod
    def parse_solution(self, text: str) -> tuple[str, str]:
        """(rationale in trained form, gold answer) from a raw rationale; ValueError if unusable."""

    def load(self, split: str, path: str | Path | None = None) -> list[Problem]:
        if path is None:
            fields = " or ".join(f"{q}/{s}" for q, s in self.layouts)
            raise ValueError(f"task '{self.name}' has no built-in data for split '{split}': pass "
                             f"path=<a JSONL file with {fields} fields>")
        return self.load_file(path)

    def load_file(self, path: str | Path) -> list[Problem]:
        """All problems of one JSONL file (see the class docstring for the error contract)."""
        path = Path(path)
        if not path.is_file():
            raise DataError("file not found", path)
        problems: list[Problem] = []
        skipped: list[str] = []
        seen_ids: set[str] = set()
        with path.open("r", encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    problem = self._parse_line(raw, path, lineno)
                    if problem.id in seen_ids:
                        raise DataError(f"duplicate id {problem.id!r}", path, lineno, "id")
                except DataError as e:
                    if not self.lenient:
                        raise
                    skipped.append(str(e))
                    continue
                seen_ids.add(problem.id)
                problems.append(problem)
        self.last_load_stats = LoadStats(str(path), len(problems), tuple(skipped))
        if skipped:
            logger.warning("%s: skipped %d bad record(s) of %s; first: %s (all listed in "
                           "task.last_load_stats.skipped)",
                           self.name, len(skipped), path, skipped[0])
        return problems

    def _parse_line(self, raw: str, path: Path, lineno: int) -> Problem:
        record = parse_record(raw, path, lineno)
        q_field, s_field = self._layout(record, path, lineno)
        question = require_str(record, q_field, path, lineno)
        raw_solution = require_str(record, s_field, path, lineno)
        try:
            solution, answer = self.parse_solution(raw_solution)
        except ValueError as e:
            raise DataError(str(e), path, lineno, s_field) from None
        return Problem(_record_id(record, path, lineno), question, solution, answer)

    def _layout(self, record: dict[str, Any], path: Path, lineno: int) -> tuple[str, str]:
        for q_field, s_field in self.layouts:
            if q_field in record:
                return q_field, s_field
        expected = " or ".join(f"'{q}'" for q, _ in self.layouts)
        raise DataError(f"missing field (expected {expected})", path, lineno, self.layouts[0][0])


def _record_id(record: dict[str, Any], path: Path, lineno: int) -> str:
    if "id" not in record:
        return f"{path.stem}:{lineno}"
    value = record["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise DataError(f"expected a non-empty string or integer, got {value!r}",
                        path, lineno, "id")
    return str(value)
