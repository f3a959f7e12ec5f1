"""Paired comparison of two evaluations: fixed / broken counts and the exact McNemar p-value."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from selfexplore.io import DataError
from selfexplore.pipeline.compare import correct_by_question, mcnemar_exact_p, paired_change


def _binomial_two_sided(k: int, n: int) -> float:
    """Reference: sum the probabilities of every outcome at most as likely as k (symmetric p=1/2)."""
    probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
    return min(1.0, sum(p for p in probs if p <= probs[k] * (1 + 1e-12)))


@pytest.mark.parametrize(("fixed", "broken"), [(8, 27), (24, 35), (2, 8), (5, 0), (0, 1), (3, 3), (14, 110)])
def test_mcnemar_matches_the_binomial_test(fixed: int, broken: int) -> None:
    p = mcnemar_exact_p(fixed, broken)
    assert p == pytest.approx(_binomial_two_sided(fixed, fixed + broken))
    assert p == mcnemar_exact_p(broken, fixed)  # two-sided: symmetric


def test_mcnemar_edge_cases() -> None:
    assert mcnemar_exact_p(0, 0) == 1.0  # nothing changed: no evidence
    assert mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)
    assert mcnemar_exact_p(4, 4) == 1.0
    with pytest.raises(ValueError, match="counts"):
        mcnemar_exact_p(-1, 2)


def test_paired_change_counts_only_shared_questions() -> None:
    before = {"a": True, "b": False, "c": False, "d": True, "only_before": False}
    after = {"a": False, "b": True, "c": True, "d": True, "only_after": True}
    change = paired_change(before, after)
    assert (change.fixed, change.broken) == (2, 1)
    assert change.p_value == pytest.approx(mcnemar_exact_p(2, 1))
    assert str(change).startswith("+2 -1 (p=")


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_correct_by_question_reads_an_eval_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "eval.jsonl", [{"question_id": "q1", "correct": True},
                                            {"question_id": "q2", "correct": False}])
    assert correct_by_question(path) == {"q1": True, "q2": False}


@pytest.mark.parametrize(("records", "line", "field"), [
    ([{"question_id": "q1", "correct": True}, {"correct": True}], 2, "question_id"),
    ([{"question_id": "q1"}], 1, "correct"),
    ([{"question_id": "q1", "correct": "yes"}], 1, "correct"),
    ([{"question_id": "q1", "correct": True}, {"question_id": "q1", "correct": False}], 2, "question_id"),
])
def test_bad_eval_file_names_line_and_field(tmp_path: Path, records: list[dict], line: int, field: str) -> None:
    path = _write(tmp_path / "eval.jsonl", records)
    with pytest.raises(DataError) as err:
        correct_by_question(path)
    assert (err.value.line, err.value.field) == (line, field)
    assert "eval.jsonl" in str(err.value)
