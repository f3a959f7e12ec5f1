"""Verifier-guided answers: one set of sampled test answers, chosen among by every selector and scorer.

Every selector sees the same samples and the same resampled subsets (`accuracy_vs_n`), so their
differences are paired; at N = all samples each selector's per-question picks are compared with
the greedy answers by the exact McNemar test (`paired_change`), the report's `change` column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from selfexplore.pipeline.compare import paired_change
from selfexplore.prm.selectors import Candidate, SelectionConfig, accuracy_vs_n, selected_correct
from selfexplore.prm.unit import candidates

if TYPE_CHECKING:
    from selfexplore.tasks.base import Task

Scorer = Callable[[Sequence[str], Sequence[Sequence[str]]], list[list[float]]]
# Selectors that need no scorer, and those that rank by one (each scorer gets its own curves).
UNSCORED = ("majority", "pass_at_n")
SCORED = ("best_of_n", "weighted_vote")


def _picks(questions: Sequence[Sequence[Candidate]], ids: Sequence[str], selector: str, how: str) -> dict[str, bool]:
    return {qid: selected_correct(q, selector, how) for qid, q in zip(ids, questions)}  # type: ignore[arg-type]


def guided_answers(samples: Sequence[Mapping[str, Any]], greedy: Mapping[str, bool], scorers: Mapping[str, Scorer],
                   task: Task, config: SelectionConfig) -> dict[str, Any]:
    """Accuracy vs N of every selector (and scorer), with each one's paired change against `greedy`.

    `samples`: graded samples of the test questions (samples.jsonl schema, N per question);
    `greedy`: question id -> whether the greedy answer is right; `scorers`: name -> `score(prompts,
    steps)` (a verifier's, or the implicit reward's). Curves are named `majority`, `pass_at_n` and
    `<scorer>/<selector>`, plus `<scorer>/best_of_n_last` (the last step's score instead of the
    minimum: the rule for soft labels, where the minimum is the rule for hard ones).
    """
    ids = list(dict.fromkeys(s["question_id"] for s in samples))
    plain = candidates(samples, task, same=task.same_answer)
    n = min(len(q) for q in plain)
    curves = accuracy_vs_n(plain, list(UNSCORED), config)
    picks = {name: _picks(plain, ids, name, config.aggregate) for name in UNSCORED}
    for scorer_name, score in scorers.items():
        scored = candidates(samples, task, score=score, same=task.same_answer)
        for name, how in (*((s, config.aggregate) for s in SCORED), ("best_of_n_last", "last")):
            selector = "best_of_n" if name == "best_of_n_last" else name
            curve = accuracy_vs_n(scored, [selector], replace(config, aggregate=how))[selector]
            curves[f"{scorer_name}/{name}"] = curve
            picks[f"{scorer_name}/{name}"] = _picks(scored, ids, selector, how)
    shared = [q for q in ids if q in greedy]
    return {
        "samples_per_question": n,
        "greedy": sum(greedy[q] for q in shared) / max(len(shared), 1),
        "curves": {name: {str(k): dict(v) for k, v in curve.items()} for name, curve in curves.items()},
        "change": {name: str(paired_change({q: greedy[q] for q in shared}, {q: p[q] for q in shared}))
                   for name, p in picks.items() if name != "pass_at_n"},
    }
