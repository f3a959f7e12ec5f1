"""Every selector on hand-made samples with known answers, and accuracy vs N over resampled subsets."""

from __future__ import annotations

import pytest

from selfexplore.prm.selectors import (
    Candidate,
    SelectionConfig,
    accuracy_vs_n,
    aggregate,
    best_of_n,
    group_answers,
    majority_vote,
    pass_at_n,
    selected_correct,
    subset,
    weighted_vote,
)

GOLD = "12"


def c(answer, scores=()):
    return Candidate(answer, answer == GOLD, tuple(scores))


# Three wrong "7"s that the verifier distrusts, two right "12"s it trusts, one sample without an answer.
QUESTION = [c("7", [0.9, 0.2]), c("12", [0.8, 0.9]), c("7", [0.6, 0.3]), c(None, [0.99]), c("7", [0.9, 0.1]),
            c("12", [0.7, 0.85])]


def test_majority_vote_follows_the_crowd() -> None:
    assert majority_vote(QUESTION).answer == "7"
    assert majority_vote([c("5"), c("12")]).answer == "5"  # a tie goes to the earliest answer
    assert majority_vote([c(None)]) is None


def test_best_of_n_min_and_last() -> None:
    assert aggregate([0.9, 0.2], "min") == 0.2 and aggregate([0.9, 0.2], "last") == 0.2
    assert best_of_n(QUESTION, "min") is QUESTION[3]  # a one-step sample scored 0.99, no answer: wrong
    assert best_of_n(QUESTION[:3], "min") is QUESTION[1]
    lenient = [c("7", [0.1, 0.95]), c("12", [0.9, 0.9])]
    assert best_of_n(lenient, "min").answer == "12" and best_of_n(lenient, "last").answer == "7"
    assert best_of_n([]) is None


def test_weighted_vote_outweighs_the_majority() -> None:
    assert weighted_vote(QUESTION, "min").answer == "12"  # 0.8 + 0.7 against 0.2 + 0.3 + 0.1
    assert weighted_vote(QUESTION, "last").answer == "12"  # 0.9 + 0.85 against 0.2 + 0.3 + 0.1


def test_pass_at_n_and_selected_correct() -> None:
    assert pass_at_n(QUESTION) and not pass_at_n([c("7"), c(None)])
    assert [selected_correct(QUESTION, s) for s in ("majority", "best_of_n", "weighted_vote", "pass_at_n")] == \
        [False, False, True, True]


def test_equivalent_spellings_vote_together() -> None:
    same = lambda a, b: float(a.replace(",", "")) == float(b.replace(",", ""))  # noqa: E731
    assert group_answers(["1,000", "7", "1000", None, "1000.0"], same) == ["1,000", "7", "1,000", None, "1,000"]


def test_accuracy_vs_n_with_intervals() -> None:
    # Question A: 1 right of 4 samples; question B: all 4 right. pass@N on A is 1 - C(3,N)/C(4,N).
    questions = [[c("12"), c("7"), c("7"), c("8")], [c("12")] * 4]
    out = accuracy_vs_n(questions, ["pass_at_n", "majority"], SelectionConfig(ns=[1, 4], subsets=200, seed=3))
    assert out["pass_at_n"][4] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert out["pass_at_n"][1]["mean"] == pytest.approx((0.25 + 1) / 2, abs=0.05)
    assert out["pass_at_n"][1]["low"] == 0.5 and out["pass_at_n"][1]["high"] == 1.0
    assert out["majority"][4]["mean"] == 0.5  # "7" twice beats "12" once on A
    again = accuracy_vs_n(questions, ["pass_at_n", "majority"], SelectionConfig(ns=[1, 4], subsets=200, seed=3))
    assert again == out
    assert subset(16, 4, 1) == subset(16, 4, 1) and len(set(subset(16, 4, 1))) == 4
    with pytest.raises(ValueError, match="only 4 samples"):
        accuracy_vs_n(questions, ["majority"], SelectionConfig(ns=[8]))
    with pytest.raises(ValueError, match="selection.ns.*\n.*selection.aggregate"):
        accuracy_vs_n(questions, ["majority"], SelectionConfig(ns=[0], aggregate="mean"))
