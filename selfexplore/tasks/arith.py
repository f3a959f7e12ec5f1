"""arith: the built-in synthetic task, multi-step arithmetic word problems made from a seed.

It is the embedded default: no download, generated in well under a second, and hard enough
for a tiny from-scratch model that Self-Explore has room to improve on SFT. Example:

    Ava has 23 marbles. She finds 17 more. Then she gives away 9. How many marbles does Ava
    have now?

    Ava starts with 23 marbles.
    23 + 17 = 40
    40 - 9 = 31
    The answer is 31

One operation per line, the arithmetic written out, so a wrong step is a local, checkable
mistake. Intermediate values stay in [1, max_value]; multiplication uses small factors.

Splits: a problem is identified by its arithmetic (start value, operations, operands), not
its wording, and its split is a fixed function of a hash of that arithmetic (10% test, 10%
validation, 80% train). So the splits never share a computation, under any seed or knobs,
even reworded. Problems are drawn from one seeded stream until every split is full; each
split is a prefix-stable function of the seed and difficulty knobs alone (asking for more
train problems never changes the test set).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from selfexplore.tasks.base import ANSWER_PREFIX, LoadStats, Problem
from selfexplore.tasks.gsm8k import GSM8KTask

SPLITS = ("train", "validation", "test")
OPERATIONS = ("+", "-", "*")
_MAX_IDLE_DRAWS = 20_000

_NAMES = (("Ava", "she", "her"), ("Ben", "he", "his"), ("Chloe", "she", "her"),
          ("Dan", "he", "his"), ("Emma", "she", "her"), ("Finn", "he", "his"),
          ("Grace", "she", "her"), ("Hugo", "he", "his"), ("Ivy", "she", "her"),
          ("Jack", "he", "his"), ("Lena", "she", "her"), ("Omar", "he", "his"))
_OBJECTS = (("marble", "marbles"), ("apple", "apples"), ("sticker", "stickers"),
            ("coin", "coins"), ("book", "books"), ("card", "cards"), ("shell", "shells"),
            ("pencil", "pencils"), ("stamp", "stamps"), ("cookie", "cookies"))
_START = ("{name} has {n} {obj}.", "{name} starts with {n} {obj}.", "{name} owns {n} {obj}.")
_STEP = {
    "+": ("{p} finds {n} more.", "{p} buys {n} more.", "{p} gets {n} more from a friend.",
          "{p} wins {n} more."),
    "-": ("{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}.", "{p} uses {n}."),
    "*": ("{p} multiplies {poss} {obj} by {n}.", "{p} gets enough to have {n} times as many."),
}
_CONNECTORS = ("Then ", "Next, ", "After that, ")
_ASK = ("How many {obj} does {name} have now?", "How many {obj} does {name} have in the end?")


class _Draw(NamedTuple):
    """One drawn problem: its arithmetic (`key` names it) and the template choices wording it."""

    key: str
    start: int
    ops: tuple[tuple[str, int], ...]
    name: int
    obj: int
    start_template: int
    step_templates: tuple[int, ...]
    connectors: tuple[int, ...]
    ask: int


def split_of(key: str) -> str:
    """The split an arithmetic key belongs to (fixed: independent of seed and sizes)."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


class ArithTask(GSM8KTask):
    """Synthetic multi-step arithmetic word problems (see the module docstring).

    Difficulty knobs: `min_steps`..`max_steps` operations per problem (default 2..4),
    operands in `min_operand`..`max_operand` (2..99), `operations` (a subset of + - *),
    multiplication factors in 2..`max_multiplier` (5), every value at most `max_value` (999).
    Sizes: `train_size` (2000), `validation_size` (200), `test_size` (500); `seed` (0).
    `load(split, path=...)` reads a GSM8K-layout JSONL file instead (GSM8K options apply).
    """

    name = "arith"

    def __init__(self, min_steps: int = 2, max_steps: int = 4, min_operand: int = 2,
                 max_operand: int = 99, operations: Sequence[str] = OPERATIONS,
                 max_multiplier: int = 5, max_value: int = 999, train_size: int = 2000,
                 validation_size: int = 200, test_size: int = 500, seed: int = 0,
                 keep_calculator_notes: bool = False, lenient: bool = False) -> None:
        super().__init__(keep_calculator_notes=keep_calculator_notes, lenient=lenient)
        operations = tuple(operations)
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        if not 1 <= min_operand <= max_operand <= max_value:
            raise ValueError("need 1 <= min_operand <= max_operand <= max_value, got "
                             f"{min_operand}, {max_operand}, {max_value}")
        if not operations or len(set(operations)) != len(operations) or \
                not set(operations) <= set(OPERATIONS):
            raise ValueError(f"operations must be distinct items of {OPERATIONS}, got {operations}")
        if "*" in operations and max_multiplier < 2:
            raise ValueError(f"max_multiplier must be >= 2 with '*', got {max_multiplier}")
        if min(train_size, validation_size, test_size) < 0:
            raise ValueError("split sizes must be >= 0")
        self.min_steps, self.max_steps = min_steps, max_steps
        self.min_operand, self.max_operand = min_operand, max_operand
        self.operations, self.max_multiplier, self.max_value = operations, max_multiplier, max_value
        self.sizes = {"train": train_size, "validation": validation_size, "test": test_size}
        self.seed = seed
        self._splits: dict[str, list[Problem]] | None = None
        self._generated_set: set[Problem] | None = None

    @property
    def knobs(self) -> dict[str, Any]:
        """The settings that define the generated data (to record next to results)."""
        return {"min_steps": self.min_steps, "max_steps": self.max_steps,
                "min_operand": self.min_operand, "max_operand": self.max_operand,
                "operations": list(self.operations), "max_multiplier": self.max_multiplier,
                "max_value": self.max_value, **{f"{s}_size": n for s, n in self.sizes.items()},
                "seed": self.seed}

    def load(self, split: str, path: str | Path | None = None) -> list[Problem]:
        if path is not None:
            return self.load_file(path)
        if split not in SPLITS:
            raise ValueError(f"arith has splits {SPLITS}, got {split!r}")
        if self._splits is None:
            self._splits = self._generate()
        problems = list(self._splits[split])
        self.last_load_stats = LoadStats(f"generated (seed={self.seed})", len(problems))
        return problems

    def first_wrong_step(self, problem: Problem, steps: list[str]) -> int | None:
        """Generated problems have one canonical rationale, so the first step that differs from
        it (whitespace aside) is the first wrong one; None for problems read from a file (their
        rationales are free text) and for a rationale that does not depart at all."""
        if self._splits is None or problem not in self._generated():
            return None
        gold = [" ".join(s.split()) for s in self.split_steps(problem.solution)]
        for t, (step, ref) in enumerate(zip(steps, gold), start=1):
            if " ".join(step.split()) != ref:
                return t
        return None if len(steps) == len(gold) else min(len(steps), len(gold)) + 1

    def _generated(self) -> set[Problem]:
        if self._generated_set is None:
            self._generated_set = {p for split in (self._splits or {}).values() for p in split}
        return self._generated_set

    def _generate(self) -> dict[str, list[Problem]]:
        rng = random.Random(self.seed)
        splits: dict[str, list[Problem]] = {s: [] for s in SPLITS}
        seen: set[str] = set()
        idle = 0
        while any(len(splits[s]) < self.sizes[s] for s in SPLITS):
            draw = self._draw(rng)
            if draw is not None and draw.key not in seen:
                seen.add(draw.key)
                split = split_of(draw.key)
                if len(splits[split]) < self.sizes[split]:
                    splits[split].append(_render(draw, f"arith:{split}:{len(splits[split])}"))
                    idle = 0
                    continue
            idle += 1
            if idle > _MAX_IDLE_DRAWS:
                found = {s: len(p) for s, p in splits.items()}
                raise ValueError(f"arith: these knobs allow too few distinct problems: found "
                                 f"{found}, asked for {self.sizes}; widen the operand or step "
                                 "range, or ask for fewer")
        return splits

    def _draw(self, rng: random.Random) -> _Draw | None:
        """One random problem, or None when no allowed operation keeps values in range."""
        uniform = rng.random  # int(uniform() * n): a fast, portable, deterministic choice

        def between(lo: int, hi: int) -> int:
            return lo + int(uniform() * (hi - lo + 1))

        value = start = between(self.min_operand, self.max_operand)
        ops = []
        for _ in range(between(self.min_steps, self.max_steps)):
            feasible = []
            for op in self.operations:
                lo, hi = self._operand_range(op, value)
                if lo <= hi:
                    feasible.append((op, lo, hi))
            if not feasible:
                return None
            op, lo, hi = feasible[int(uniform() * len(feasible))]
            operand = between(lo, hi)
            ops.append((op, operand))
            value = apply(op, value, operand)
        key = str(start) + "".join(f"{op}{n}" for op, n in ops)
        return _Draw(key, start, tuple(ops), int(uniform() * len(_NAMES)),
                     int(uniform() * len(_OBJECTS)), int(uniform() * len(_START)),
                     tuple(int(uniform() * len(_STEP[op])) for op, _ in ops),
                     tuple(int(uniform() * len(_CONNECTORS)) for _ in ops),
                     int(uniform() * len(_ASK)))

    def _operand_range(self, op: str, value: int) -> tuple[int, int]:
        """Operands for `op` that keep the result in [1, max_value] (empty when lo > hi)."""
        if op == "+":
            return self.min_operand, min(self.max_operand, self.max_value - value)
        if op == "-":
            return self.min_operand, min(self.max_operand, value - 1)
        return 2, min(self.max_multiplier, self.max_value // value)


def _render(draw: _Draw, problem_id: str) -> Problem:
    """Word a drawn problem and write its one-operation-per-line rationale."""
    name, pronoun, poss = _NAMES[draw.name]
    singular, plural = _OBJECTS[draw.obj]
    start_obj = singular if draw.start == 1 else plural
    sentences = [_START[draw.start_template].format(name=name, n=draw.start, obj=start_obj)]
    lines = [f"{name} starts with {draw.start} {start_obj}."]
    value = draw.start
    for k, ((op, operand), template) in enumerate(zip(draw.ops, draw.step_templates)):
        clause = _STEP[op][template].format(p=pronoun, poss=poss, obj=plural, n=operand)
        sentence = clause if k == 0 else _CONNECTORS[draw.connectors[k]] + clause
        sentences.append(sentence[0].upper() + sentence[1:])
        result = apply(op, value, operand)
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    sentences.append(_ASK[draw.ask].format(obj=plural, name=name))
    lines.append(f"{ANSWER_PREFIX} {value}")
    return Problem(problem_id, " ".join(sentences), "\n".join(lines), str(value))
