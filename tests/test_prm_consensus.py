"""Consensus check of pits with fresh draws, and label accuracy against arith's true first error."""

from __future__ import annotations

import pytest

from selfexplore.io import read_jsonl, write_jsonl
from selfexplore.prm.config import ConsensusConfig
from selfexplore.prm.consensus import check_pits, pit_seeds
from selfexplore.prm.data import write_prm_data
from selfexplore.tasks import get_task

TASK = get_task("arith", train_size=20, validation_size=2, test_size=2)
PROBLEM = next(p for p in TASK.load("train") if len(TASK.split_steps(p.solution)) >= 4)
GOLD_STEPS = TASK.split_steps(PROBLEM.solution)


class PerfectCompleter:
    """Reaches the gold answer from any prefix that follows the canonical rationale; never otherwise."""

    def __init__(self) -> None:
        self.generated_tokens, self.seeds = 0, []

    def generate(self, prompts, n, draws, seed):
        self.seeds.extend(seed)
        out = []
        for p in prompts:
            steps = TASK.split_steps(p[len(TASK.prompt(PROBLEM)):])
            ok = steps == GOLD_STEPS[:len(steps)]
            out.append([f"The answer is {PROBLEM.answer if ok else 0}"] * n)
        return out


def wrong_at(t: int) -> list[str]:
    """The canonical rationale with step t replaced (its first wrong step is t)."""
    steps = list(GOLD_STEPS)
    steps[t - 1] = "1 + 1 = 3" if t < len(steps) else "The answer is 0"
    if t < len(steps):
        steps[-1] = "The answer is 0"
    return steps


def record(sample: str, steps: list[str], pit: int) -> dict:
    return {"sample_id": sample, "question_id": PROBLEM.id, "prompt": TASK.prompt(PROBLEM), "gold": PROBLEM.answer,
            "steps": steps, "status": "pit", "pit": pit,
            "outcomes": [{"step": t, "correct": [t < pit] * 4} for t in range(1, pit + 1)]}


@pytest.fixture()
def files(tmp_path):
    true_pit, false_pit = wrong_at(2), wrong_at(3)
    records = [record("s:0", true_pit, 2), record("s:1", false_pit, 2)]  # s:1's pit is a right step
    samples = [{"id": r["sample_id"], "question_id": PROBLEM.id, "prompt": r["prompt"],
                "completion": "\n".join(r["steps"]),
                "correct": False, "finished": True, "gold": PROBLEM.answer} for r in records]
    write_jsonl(tmp_path / "explore.jsonl", records)
    write_jsonl(tmp_path / "samples.jsonl", samples)
    return tmp_path / "explore.jsonl", tmp_path / "samples.jsonl"


def test_consensus_confirms_true_pits_and_label_accuracy_is_measured(files, tmp_path) -> None:
    sampler = PerfectCompleter()
    stats = write_prm_data(*files, tmp_path / "prm.jsonl", TASK, {PROBLEM.id: PROBLEM}, sampler=sampler,
                           consensus=ConsensusConfig(k=3, seed=5))
    rows = {r["sample_id"]: r for r in read_jsonl(tmp_path / "prm.jsonl")}
    assert rows["s:0"]["consensus"] == {"k": 3, "successes": 0, "confirmed": True}
    assert rows["s:1"]["consensus"] == {"k": 3, "successes": 3, "confirmed": False}
    assert (stats["pits_checked"], stats["pits_confirmed"], stats["pit_agreement"]) == (2, 1, 0.5)
    quality = stats["label_quality"]
    assert (quality["pit_at_first_error"], quality["pit_before_first_error"]) == (0.5, 0.5)
    assert quality["step_label_accuracy"] == 3 / 4  # s:1 labels its right step 2 False
    assert stats["label_quality_confirmed"]["pit_at_first_error"] == 1.0
    assert stats["label_quality_confirmed"]["step_label_accuracy"] == 1.0
    row = rows["s:0"]
    assert sampler.seeds[:3] == pit_seeds(ConsensusConfig(k=3, seed=5), row)  # a seed per fresh draw


def test_keep_confirmed_drops_false_pits_only(files, tmp_path) -> None:
    write_prm_data(*files, tmp_path / "prm.jsonl", TASK, {PROBLEM.id: PROBLEM}, sampler=PerfectCompleter(),
                   consensus=ConsensusConfig(k=2, keep="confirmed"))
    assert [r["sample_id"] for r in read_jsonl(tmp_path / "prm.jsonl")] == ["s:0"]


def test_outcome_rows_are_not_checked_and_config_is_validated() -> None:
    row = {"prompt": "Q\n", "completions": ["The answer is 1"], "labels": [True], "source": "outcome", "pit": None,
           "question_id": "q", "sample_id": "q:0"}
    out, stats = check_pits([row], PerfectCompleter(), TASK, {"q": "1"}, ConsensusConfig(keep="confirmed"))
    assert out == [{**row, "consensus": None}] and stats["pits_checked"] == 0
    problems = ConsensusConfig(k=0, keep="some").problems()
    assert problems[0].startswith("consensus.k must be >= 1") and problems[-1].startswith("consensus.keep")
