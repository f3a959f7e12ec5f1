"""prm.jsonl rows from explorations of a scripted sampler whose pits are known in advance."""

from __future__ import annotations

import json

import pytest
from test_explore import FakeTask

from selfexplore.explore import ExploreConfig, Rationale, find_first_pits
from selfexplore.io import DataError, read_json, read_jsonl, write_jsonl
from selfexplore.prm.config import PRMDataConfig
from selfexplore.prm.data import path_round, write_prm_data
from selfexplore.prm.rows import TRL_COLUMNS, build_prm_rows
from selfexplore.tasks.base import Problem

GOLD = "10"


class StepTask(FakeTask):
    """test_explore's task with blank lines dropped from the steps."""

    name = "steps"

    def split_steps(self, text: str) -> list[str]:
        return [s for s in text.strip().split("\n") if s.strip()]


class PoisonSampler:
    """A prefix that holds 'BAD' never recovers; one whose last step says 'HALF' recovers on its third
    draw only (of every four); any other prefix always does. So the first 'BAD' step is the pit."""

    def __init__(self) -> None:
        self.generated_tokens, self.drawn = 0, {}

    def draw(self, p: str) -> str:
        if "BAD" in p:
            return "The answer is 0"
        if p.rstrip("\n").split("\n")[-1].endswith("HALF"):
            self.drawn[p] = self.drawn.get(p, 0) + 1
            return f"The answer is {GOLD}" if self.drawn[p] % 4 == 3 else "The answer is 0"
        return f"The answer is {GOLD}"

    def generate(self, prompts, n, draws, seed):
        return [[self.draw(p) for _ in range(n)] for p in prompts]


TASK = StepTask()
PROBLEM = Problem("q1", "Q1: what is it?", "5 * 2 = 10\nThe answer is 10", GOLD)
PROMPT = TASK.prompt(PROBLEM)
WRONG = {  # rationale -> its pit (step number), None: no pit
    "a1 HALF\na2 BAD\na3\nThe answer is 3": 2,
    "b1 BAD\nb2\nThe answer is 4": 1,
    "c1\nc2\nc3\nThe answer is 5 BAD": 4,
    "The answer is 7": "single",
}
CORRECT = ["5 * 2 = 10\nThe answer is 10", "2 * 5 = 10\nThe answer is 10"]


def samples() -> list[dict]:
    texts = [(t, False) for t in WRONG] + [(t, True) for t in CORRECT]
    return [{"id": f"q1:{i}", "question_id": "q1", "prompt": PROMPT, "completion": t, "correct": ok,
             "finished": True, "answer": TASK.extract_answer(t), "gold": GOLD} for i, (t, ok) in enumerate(texts)]


def explored(mode: str = "exhaustive") -> list[dict]:
    rats = [Rationale(s["id"], "q1", PROMPT, GOLD, s["completion"], CORRECT[0]) for s in samples() if not s["correct"]]
    return find_first_pits(rats, PoisonSampler(), TASK, ExploreConfig(k=4, mode=mode, seed=0))


@pytest.mark.parametrize("mode", ["exhaustive", "adaptive"])
def test_rows_match_the_known_pits(mode: str) -> None:
    records = explored(mode)
    correct = [s for s in samples() if s["correct"]]
    rows, stats = build_prm_rows(records, correct, TASK, k=4, round_index=2)
    by_sample = {r["sample_id"]: r for r in rows}
    for s in samples():
        r = by_sample[s["id"]]
        assert list(r)[:3] == list(TRL_COLUMNS)
        steps = TASK.split_steps(s["completion"])
        pit = WRONG.get(s["completion"])
        if s["correct"]:
            assert (r["completions"], r["labels"], r["source"]) == (steps, [True] * len(steps), "outcome")
            assert r["pit"] is None
        elif pit == "single":
            assert (r["completions"], r["labels"], r["source"], r["pit"]) == (steps, [False], "outcome", 1)
        else:
            assert r["completions"] == steps[:pit]
            assert r["labels"] == [True] * (pit - 1) + [False]
            assert (r["source"], r["pit"], r["k"], r["round"]) == ("explored", pit, 4, 2)
            assert r["mc"][-1] == 0.0 and r["draws"][-1] == 4
            assert all(isinstance(x, bool) for x in r["labels"])
    half = by_sample["q1:0"]
    assert half["mc"][0] == 0.25  # adaptive draws 1, 1, 2: its third wave holds the success
    assert half["draws"][0] == 4
    assert stats["rows_by_source"] == {"explored": 3, "outcome": 3}
    assert stats["negative_steps"] == 4 and stats["disagree_total"] == 0


def test_labels_that_disagree_with_the_answer_are_counted() -> None:
    # A wrong rationale whose every step recovers (no pit) and a "correct" sample the task grades wrong.
    no_pit = {"sample_id": "q1:9", "question_id": "q1", "prompt": PROMPT, "gold": GOLD, "status": "no_pit",
              "steps": ["x1", "The answer is 3"], "pit": None,
              "outcomes": [{"step": 1, "correct": [True]}, {"step": 2, "correct": [False, True]}]}
    liar = {**samples()[0], "id": "q1:8", "correct": True}
    rows, stats = build_prm_rows([no_pit], [liar], TASK, k=4)
    assert rows == [] and stats["disagree"] == {"correct_sample_graded_wrong": 1, "no_pit_on_wrong": 1}
    rows, stats = build_prm_rows([no_pit], [liar], TASK, k=4, config=PRMDataConfig(disagreeing="keep"))
    assert [r["labels"] for r in rows] == [[True, True], [True] * 4] and stats["disagree_total"] == 2


def test_a_record_that_no_search_made_is_refused() -> None:
    (rec, *_) = explored()
    bad = {**rec, "outcomes": [{**rec["outcomes"][0], "correct": [False] * 4}, *rec["outcomes"][1:]]}
    with pytest.raises(DataError, match="no successful draw"):
        build_prm_rows([bad], [], TASK, k=4)
    with pytest.raises(DataError, match="k=8"):
        build_prm_rows([rec], [], TASK, k=8)


def _files(tmp_path, round_dir: str = "round_1"):
    folder = tmp_path / round_dir
    write_jsonl(folder / "explore" / "explore.jsonl", explored())
    write_jsonl(folder / "explorer_samples.jsonl", samples())
    return folder / "explore" / "explore.jsonl", folder / "explorer_samples.jsonl"


def test_write_prm_data_from_files(tmp_path) -> None:
    explore_path, samples_path = _files(tmp_path, "round_3")
    stats = write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})
    rows = read_jsonl(tmp_path / "prm.jsonl")
    assert stats["round"] == 3 and stats["k"] == 4 and len(rows) == 6
    assert {r["round"] for r in rows} == {3}
    assert read_json(tmp_path / "prm_stats.json")["rows"] == 6
    assert path_round("runs/x/round_12/explore/explore.jsonl") == 12 and path_round("a/b.jsonl") is None


def test_files_of_another_task_or_round_are_refused(tmp_path) -> None:
    explore_path, samples_path = _files(tmp_path)
    other = Problem("gsm:1", "Another question", "The answer is 1", "1")
    with pytest.raises(DataError, match=r"question 'q1' is not a problem of task 'steps'.*another task") as e:
        write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK, {"gsm:1": other})
    assert e.value.line == 1 and e.value.field == "question_id"
    with pytest.raises(DataError, match="field 'gold'"):
        write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK,
                       {"q1": Problem("q1", "Q1: what is it?", "", "11")})
    with pytest.raises(DataError, match="asked for round 2 but the explore file is round 1's"):
        write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM}, round_index=2)
    _, samples_2 = _files(tmp_path, "round_2")
    with pytest.raises(DataError, match="round 1's but the samples file .* is round 2's"):
        write_prm_data(explore_path, samples_2, tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})
    changed = [{**s, "completion": s["completion"] + "\nmore"} for s in samples()]
    write_jsonl(tmp_path / "other_samples.jsonl", changed)
    with pytest.raises(DataError, match="different rounds or runs"):
        write_prm_data(explore_path, tmp_path / "other_samples.jsonl", tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})
    assert not (tmp_path / "prm.jsonl").exists()
    # the pair builders strip the text they hand to exploration: a sample ending in spaces is the same one
    spaced = [{**s, "completion": s["completion"] + "  "} for s in samples()]
    write_jsonl(tmp_path / "spaced_samples.jsonl", spaced)
    write_prm_data(explore_path, tmp_path / "spaced_samples.jsonl", tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})


def test_bad_lines_name_file_line_and_field(tmp_path) -> None:
    explore_path, samples_path = _files(tmp_path)
    records = read_jsonl(explore_path)
    records[1]["pit"] = 99
    write_jsonl(explore_path, records)
    with pytest.raises(DataError) as e:
        write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})
    assert (e.value.path, e.value.line, e.value.field) == (explore_path, 2, "pit")
    explore_path.write_text(json.dumps(records[0]) + "\nnot json\n")
    with pytest.raises(DataError, match="line 2"):
        write_prm_data(explore_path, samples_path, tmp_path / "prm.jsonl", TASK, {"q1": PROBLEM})


def test_prm_data_command(tmp_path) -> None:
    from selfexplore.cli import main
    from selfexplore.tasks import get_task

    task = get_task("arith", train_size=20, validation_size=2, test_size=2)
    problem = task.load("train")[0]
    steps = task.split_steps(problem.solution)
    wrong = "\n".join(steps[:-1] + ["The answer is 0"])
    sample_rows = [{"id": f"{problem.id}:{i}", "question_id": problem.id, "prompt": task.prompt(problem),
                    "completion": text, "correct": ok, "finished": True, "answer": task.extract_answer(text),
                    "gold": problem.answer} for i, (text, ok) in enumerate([(problem.solution, True), (wrong, False)])]
    record = {"sample_id": f"{problem.id}:1", "question_id": problem.id, "prompt": task.prompt(problem),
              "gold": problem.answer, "steps": task.split_steps(wrong), "status": "pit", "pit": len(steps),
              "outcomes": [{"step": t, "correct": [t < len(steps)] * 2} for t in range(1, len(steps) + 1)]}
    write_jsonl(tmp_path / "explore.jsonl", [record])
    write_jsonl(tmp_path / "samples.jsonl", sample_rows)
    main(["prm-data", "--explore", str(tmp_path / "explore.jsonl"), "--samples", str(tmp_path / "samples.jsonl"),
          "--out", str(tmp_path / "prm.jsonl"),
          "--task_options", '{"train_size": 20, "validation_size": 2, "test_size": 2}'])
    rows = read_jsonl(tmp_path / "prm.jsonl")
    assert [r["labels"] for r in rows] == [[True] * (len(steps) - 1) + [False], [True] * len(steps)]
    assert rows[0]["k"] == 2


def test_outcome_rows_and_the_question_split() -> None:
    from selfexplore.prm.rows import build_outcome_rows, split_by_question

    rows = build_outcome_rows(samples(), TASK, round_index=2)
    assert [r["labels"] for r in rows] == [[False] * 4, [False] * 3, [False] * 4, [False], [True] * 2, [True] * 2]
    assert {r["source"] for r in rows} == {"outcome"}
    many = [{"question_id": f"q{i % 50}"} for i in range(200)]
    train, held = split_by_question(many, 0.2, seed=1)
    assert not {r["question_id"] for r in train} & {r["question_id"] for r in held}
    assert 0 < len(held) < len(train) and split_by_question(many, 0.2, seed=1) == (train, held)
