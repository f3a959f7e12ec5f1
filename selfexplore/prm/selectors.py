"""Verifier-guided answers: choose among the same N samples of a question, and accuracy vs N.

Selectors are pure functions of a question's `Candidate`s (its sampled answers, whether each is
correct, and a scorer's per-step scores): majority vote over extracted answers; verifier best-of-N;
the verifier-weighted vote (the answer with the largest summed score, best or near best in
Math-Shepherd and Snell et al. 2024); pass@N, the oracle ceiling. A rationale's score aggregates its
steps by "min" (default: with hard labels a rationale is as good as its worst step, so one bad step
sinks it) or "last" (the score at the final step, which reads the whole rationale; Snell's choice for
soft labels). Answers are compared as given: group equivalent spellings first (`group_answers`).
Ties go to the earliest sample, so every selector is deterministic.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from selfexplore.hashing import derive_seed
from selfexplore.validation import raise_problems

Aggregate = Literal["min", "last"]
SelectorName = Literal["majority", "best_of_n", "weighted_vote", "pass_at_n"]


@dataclass(frozen=True)
class Candidate:
    """One sampled answer: the extracted final answer (None: none found), its grade, its step scores."""

    answer: str | None
    correct: bool
    scores: tuple[float, ...] = ()


def aggregate(scores: Sequence[float], how: Aggregate = "min") -> float:
    """A rationale's score from its steps' ("min" or "last"); -inf for a rationale without steps."""
    if not scores:
        return float("-inf")
    return min(scores) if how == "min" else scores[-1]


def group_answers(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> list[str | None]:
    """Each answer replaced by the first earlier answer `same` calls equal (e.g. `grading.is_equiv`)."""
    seen: list[str] = []
    out: list[str | None] = []
    for a in answers:
        rep = None if a is None else next((s for s in seen if same(a, s)), None)
        if a is not None and rep is None:
            seen.append(a)
            rep = a
        out.append(rep)
    return out


def _vote(candidates: Sequence[Candidate], weight: Callable[[Candidate], float]) -> Candidate | None:
    """The first candidate of the answer with the largest total weight (answers in order of first sight)."""
    totals: dict[str, float] = {}
    first: dict[str, Candidate] = {}
    for c in candidates:
        if c.answer is not None:
            totals[c.answer] = totals.get(c.answer, 0.0) + weight(c)
            first.setdefault(c.answer, c)
    if not totals:
        return None
    best = max(totals, key=lambda a: totals[a])  # max keeps the first of equal totals
    return first[best]


def majority_vote(candidates: Sequence[Candidate]) -> Candidate | None:
    """The most frequent extracted answer (None when no sample has one)."""
    return _vote(candidates, lambda c: 1.0)


def best_of_n(candidates: Sequence[Candidate], how: Aggregate = "min") -> Candidate | None:
    """The sample the verifier scores highest."""
    if not candidates:
        return None
    return max(candidates, key=lambda c: aggregate(c.scores, how))


def weighted_vote(candidates: Sequence[Candidate], how: Aggregate = "min") -> Candidate | None:
    """The answer whose samples' scores sum highest (scores should be non-negative: P(good))."""
    return _vote(candidates, lambda c: aggregate(c.scores, how))


def pass_at_n(candidates: Sequence[Candidate]) -> bool:
    """Whether any sample is correct (the ceiling every selector is bounded by)."""
    return any(c.correct for c in candidates)


def selected_correct(candidates: Sequence[Candidate], selector: SelectorName, how: Aggregate = "min") -> bool:
    """Whether `selector` picks a correct answer among `candidates`."""
    if selector == "pass_at_n":
        return pass_at_n(candidates)
    pick = {"majority": lambda: majority_vote(candidates), "best_of_n": lambda: best_of_n(candidates, how),
            "weighted_vote": lambda: weighted_vote(candidates, how)}[selector]()
    return pick is not None and pick.correct


@dataclass
class SelectionConfig:
    """How accuracy vs N is measured (`accuracy_vs_n`).

    ns: sample counts N to report; each must be at most the samples drawn per question.
    subsets: resampled subsets per N (each question's N samples drawn without replacement from its
      samples); the mean and the interval are over these.
    confidence: the central share of subset accuracies the interval spans.
    aggregate: how best-of-N and the weighted vote score a rationale ("min" or "last").
    seed: base of the subsets' seeds (`derive_seed`).
    """

    ns: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    subsets: int = 20
    confidence: float = 0.9
    aggregate: Aggregate = "min"
    seed: int = 0

    def problems(self, prefix: str = "selection") -> list[str]:
        """Every invalid value, named `prefix.field`."""
        problems = []
        if not self.ns or any(n < 1 for n in self.ns):
            problems.append(f"{prefix}.ns must be sample counts >= 1, got {self.ns!r}")
        if self.subsets < 1:
            problems.append(f"{prefix}.subsets must be >= 1, got {self.subsets!r}")
        if not 0 < self.confidence < 1:
            problems.append(f"{prefix}.confidence must be in (0, 1), got {self.confidence!r}")
        if self.aggregate not in ("min", "last"):
            problems.append(f"{prefix}.aggregate must be 'min' or 'last', got {self.aggregate!r}")
        return problems


def subset(n_samples: int, n: int, seed: int) -> list[int]:
    """n distinct sample indices out of n_samples, in sample order, drawn from `seed` alone."""
    keys = sorted(range(n_samples), key=lambda i: derive_seed(seed, i))
    return sorted(keys[:n])


def accuracy_vs_n(questions: Sequence[Sequence[Candidate]], selectors: Sequence[SelectorName],
                  config: SelectionConfig | None = None) -> dict[str, dict[int, Mapping[str, float]]]:
    """{selector: {N: {"mean", "low", "high"}}}: accuracy over questions of each selector using N of each
    question's samples, over `config.subsets` resampled subsets (the same subsets for every selector,
    so their differences are paired). At N = all samples every subset is the same."""
    config = config or SelectionConfig()
    raise_problems(config.problems(), "selection config")
    fewest = min(len(q) for q in questions)
    if max(config.ns) > fewest:
        raise ValueError(f"N={max(config.ns)} asked for, but a question has only {fewest} samples")
    tail = (1 - config.confidence) / 2
    out: dict[str, dict[int, Mapping[str, float]]] = {s: {} for s in selectors}
    for n in config.ns:
        picks = [[[q[i] for i in subset(len(q), n, derive_seed(config.seed, n, s, qi))]
                  for qi, q in enumerate(questions)] for s in range(config.subsets)]
        for name in selectors:
            accs = sorted(sum(selected_correct(c, name, config.aggregate) for c in sub) / len(sub) for sub in picks)
            out[name][n] = {"mean": statistics.fmean(accs), "low": _quantile(accs, tail),
                            "high": _quantile(accs, 1 - tail)}
    return out


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
