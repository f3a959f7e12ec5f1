"""Tasks: JSONL loaders (layouts, strict and lenient errors), MATH step splitting and boxed
answers, the synthetic arith generator, grading of gold rationales, and the real GSM8K files."""

from __future__ import annotations

import doctest
import json
import logging
import re
from pathlib import Path

import pytest

from selfexplore.io import DataError
from selfexplore.tasks import TASKS, ArithTask, GSM8KTask, MathTask, get_task, math_task
from selfexplore.tasks.arith import split_of
from selfexplore.tasks.math_task import split_latex_steps

REAL_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
STEP_LINE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: list[dict]) -> Path:
    return write_lines(path, [json.dumps(r) for r in records])


# --------------------------------------------------------------------------- registry


def test_registry_builds_every_task_and_rejects_unknown_names_and_options():
    assert set(TASKS) == {"gsm8k", "math", "arith"}
    for name in TASKS:
        assert get_task(name).name == name
    assert get_task("gsm8k", keep_calculator_notes=True).keep_calculator_notes
    assert get_task("arith", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown task 'gsm9k'.*arith, gsm8k, math"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="no option.*'num_stepz'"):
        get_task("arith", num_stepz=3)


@pytest.mark.parametrize("name", ["gsm8k", "math"])
def test_file_tasks_without_path_say_to_pass_one(name):
    with pytest.raises(ValueError, match="no built-in data for split 'test'.*pass path="):
        get_task(name).load("test")


# --------------------------------------------------------------------------- gsm8k


GSM_RESPONSE = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\n"
                "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.\n#### 1,072")


def test_gsm8k_reads_both_layouts_converts_answer_line_and_strips_notes(tmp_path):
    path = write_records(tmp_path / "mini.jsonl", [
        {"question": "How many clips?", "answer": GSM_RESPONSE},
        {"query": "And now?", "response": "3 + 4 = <<3+4=7>>7\n#### -7"},
        {"id": "q-9", "question": "Third?", "answer": "Add.\nThe answer is 5"},
    ])
    problems = GSM8KTask().load("train", path)
    assert [p.id for p in problems] == ["mini:1", "mini:2", "q-9"]
    assert [p.question for p in problems] == ["How many clips?", "And now?", "Third?"]
    assert problems[0].solution == ("Natalia sold 48/2 = 24 clips in May.\n"
                                    "Natalia sold 48+24 = 72 clips altogether.\n"
                                    "The answer is 1072")
    assert problems[0].answer == "1072"
    assert (problems[1].solution, problems[1].answer) == ("3 + 4 = 7\nThe answer is -7", "-7")
    assert (problems[2].solution, problems[2].answer) == ("Add.\nThe answer is 5", "5")


def test_gsm8k_keeps_calculator_notes_when_asked(tmp_path):
    path = write_records(tmp_path / "a.jsonl", [{"question": "Q", "answer": GSM_RESPONSE}])
    (problem,) = GSM8KTask(keep_calculator_notes=True).load("test", path)
    assert problem.solution.split("\n") == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.",
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether.",
        "The answer is 1072"]
    assert problem.answer == "1072"


def test_gsm8k_steps_are_nonempty_lines_and_prompt_is_question_plus_newline(tmp_path):
    task = GSM8KTask()
    assert task.split_steps("a = 1\n\n  \n b = 2\nThe answer is 2\n") == [
        "a = 1", " b = 2", "The answer is 2"]
    path = write_records(tmp_path / "a.jsonl", [{"question": "  Why? \n", "answer": "#### 1"}])
    assert task.prompt(task.load("test", path)[0]) == "Why?\n"


BAD_GSM8K = [
    ("{not json", None, "not valid JSON"),
    ('["a", "list"]', None, "expected a JSON object"),
    ('{"prompt": "Q", "answer": "#### 1"}', "question", "missing field"),
    ('{"question": "Q"}', "answer", "missing field"),
    ('{"question": "Q", "answer": "  "}', "answer", "empty value"),
    ('{"question": "", "answer": "#### 1"}', "question", "empty value"),
    ('{"question": "Q", "answer": 3}', "answer", "expected a string"),
    ('{"question": "Q", "answer": "1 + 1 = 2"}', "answer", "no gold answer"),
    ('{"question": "Q", "answer": "x\\n#### two"}', "answer", "not a number"),
    ('{"question": "Q", "answer": "#### "}', "answer", "not a number"),
    ('{"question": "Q", "answer": "#### 3\\nmore text"}', "answer", "on the last line"),
    ('{"question": "Q", "answer": "#### 3\\n#### 4"}', "answer", "exactly one"),
    ('{"id": ["x"], "question": "Q", "answer": "#### 3"}', "id", "non-empty string or integer"),
    ('{"id": "p1", "question": "Q", "answer": "#### 3"}', "id", "duplicate id"),
]


@pytest.mark.parametrize(("bad_line", "field", "message"), BAD_GSM8K)
def test_gsm8k_bad_record_raises_with_file_line_and_field(tmp_path, bad_line, field, message):
    good = '{"id": "p1", "question": "Q", "answer": "#### 1"}'
    path = write_lines(tmp_path / "bad.jsonl", [good, "", bad_line])
    with pytest.raises(DataError, match=message) as info:
        GSM8KTask().load("train", path)
    assert info.value.line == 3 and info.value.field == field
    assert str(path) in str(info.value) and "line 3" in str(info.value)
    if field is not None:
        assert f"field '{field}'" in str(info.value)


def test_gsm8k_lenient_loading_skips_and_counts_bad_records(tmp_path, caplog):
    lines = ['{"question": "Q1", "answer": "#### 1"}', *(bad for bad, _, _ in BAD_GSM8K[:6]),
             '{"query": "Q2", "response": "#### 2"}']
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    task = get_task("gsm8k", lenient=True)
    with caplog.at_level(logging.WARNING):
        problems = task.load("train", path)
    assert [p.answer for p in problems] == ["1", "2"]
    stats = task.last_load_stats
    assert (stats.source, stats.loaded, stats.num_skipped) == (str(path), 2, 6)
    assert [f"line {n}" in msg for n, msg in zip(range(2, 8), stats.skipped)] == [True] * 6
    assert "skipped 6 bad record(s)" in caplog.text
    task.load("train", write_lines(tmp_path / "clean.jsonl", lines[:1]))
    assert task.last_load_stats.num_skipped == 0


def test_missing_file_raises_even_when_lenient(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        GSM8KTask(lenient=True).load("train", tmp_path / "nope.jsonl")


def test_gsm8k_gold_rationale_grades_correct_and_a_wrong_answer_does_not(tmp_path):
    path = write_records(tmp_path / "g.jsonl", [{"question": "Q", "answer": GSM_RESPONSE}])
    task = GSM8KTask()
    (problem,) = task.load("test", path)
    assert task.extract_answer(problem.solution) == "1072"
    assert task.is_correct(problem.solution, problem.answer)
    assert task.is_correct("so\nThe answer is 1,072", problem.answer)
    assert not task.is_correct(problem.solution.replace("1072", "1073"), problem.answer)
    assert not task.is_correct("no final answer here", problem.answer)


# --------------------------------------------------------------------------- math


def test_math_gold_is_the_last_boxed_as_grading_reads_it():
    def gold(solution: str) -> str:
        return MathTask().parse_solution(solution)[1]

    assert gold(r"so $\boxed{2}$ no, $\boxed{\frac{1}{\sqrt{2}}}$.") == r"\frac{1}{\sqrt{2}}"
    assert gold(r"$\boxed{\{1, 2\}}$") == r"\{1, 2\}"
    assert gold(r"$\fbox{7}$") == "7"
    assert gold(r"is $\boxed 5$.") == "5"
    assert gold(r"$\boxed{\boxed{1} + 1}$") == r"\boxed{1} + 1"  # the outer box, as a model's answer
    assert gold(r"$\boxed{3}$, then $\boxed{\frac{1}{2}$") == "3"  # an unclosed box is passed over
    for solution in (r"$\boxed{\boxed{1} + 1}$", r"$\boxed{3}$ then $\boxed{}$"):
        assert gold(solution) == MathTask().extract_answer(solution)


def test_math_reads_both_layouts_gold_is_last_boxed_and_trained_form_ends_with_answer(tmp_path):
    path = write_records(tmp_path / "m.jsonl", [
        {"problem": "Find $x$.",
         "solution": r"First $\boxed{3}$. Then $x = \boxed{\dfrac{1}{2}}$."},
        {"query": "Find $y$.", "response": "We get $y = \\boxed{\\begin{pmatrix} 1 \\\\\n 2 "
                                           "\\end{pmatrix}}$.\nThe answer is: 7"},
        {"query": "Find $z$.", "response": "Clearly.\nThe answer is: $\\frac{1}{3}$"},
    ])
    problems = MathTask().load("test", path)
    assert [p.id for p in problems] == ["m:1", "m:2", "m:3"]
    assert problems[0].answer == r"\dfrac{1}{2}"
    assert problems[0].solution == ("First $\\boxed{3}$. Then $x = \\boxed{\\dfrac{1}{2}}$.\n"
                                    "The answer is \\dfrac{1}{2}")
    # boxed answer wins over a stale answer line, which is replaced; whitespace is collapsed
    assert problems[1].answer == r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"
    assert problems[1].solution.endswith("$.\nThe answer is " + problems[1].answer)
    assert problems[1].solution.count("The answer is") == 1
    assert (problems[2].answer, problems[2].solution) == (
        r"\frac{1}{3}", "Clearly.\nThe answer is \\frac{1}{3}")


@pytest.mark.parametrize(("bad_line", "field", "message"), [
    ('{"problem": "P", "solution": "It is 4."}', "solution", "no gold answer"),
    ('{"problem": "P", "solution": "It is $\\\\boxed{4$."}', "solution", "no gold answer"),
    ('{"problem": "P", "solution": "$\\\\boxed{ }$"}', "solution", "no gold answer"),
    ('{"problem": "P", "answer": "$\\\\boxed{4}$"}', "solution", "missing field"),
    ('{"question": "P", "solution": "$\\\\boxed{4}$"}', "problem", "missing field"),
])
def test_math_bad_record_raises_with_file_line_and_field(tmp_path, bad_line, field, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"problem": "P", "solution": "$\\\\boxed{1}$"}',
                                                bad_line])
    with pytest.raises(DataError, match=message) as info:
        MathTask().load("train", path)
    assert (info.value.line, info.value.field) == (2, field)
    assert str(path) in str(info.value)
    task = MathTask(lenient=True)
    assert [p.answer for p in task.load("train", path)] == ["1"]
    assert task.last_load_stats.num_skipped == 1


@pytest.mark.parametrize(("text", "steps"), [
    ("We have $x = 1.5$. Then $2x = 3$.\nSo the answer is $3$.",
     ["We have $x = 1.5$.", "Then $2x = 3$.", "So the answer is $3$."]),
    # display math and environments stay whole, even across lines and sentence ends
    ("Expand:\n$$a = b. C = d.$$\nAlso \\[x.\nY\\] and\n\\begin{align*}\nu &= v. W \\\\\n"
     "\\begin{cases} 1. Z \\end{cases}\n\\end{align*}\nDone!",
     ["Expand:", "$$a = b. C = d.$$", "Also \\[x.\nY\\] and",
      "\\begin{align*}\nu &= v. W \\\\\n\\begin{cases} 1. Z \\end{cases}\n\\end{align*}",
      "Done!"]),
    # never inside braces; escaped dollars are text; abbreviations, decimals, list markers
    ("Note \\textbf{this. Not\nsplit} here. It costs \\$5. Really? e.g. this. 1. First.",
     ["Note \\textbf{this. Not\nsplit} here.", "It costs \\$5.", "Really? e.g. this.",
      "1. First."]),
    ("Inline \\(a. B\\) stays. Ok", ["Inline \\(a. B\\) stays.", "Ok"]),
    # an unclosed inline math or brace ends at a blank line instead of eating the rest
    ("Bad $x = 1. Y\n\nNext line. Last", ["Bad $x = 1. Y", "Next line.", "Last"]),
    ("Bad {x. Y\n\nNext. Z", ["Bad {x. Y", "Next.", "Z"]),
    ("", []),
])
def test_math_step_splitter(text, steps):
    assert split_latex_steps(text) == steps
    assert MathTask().split_steps(text) == steps


def test_math_module_doc_examples_hold():
    assert doctest.testmod(math_task).failed == 0


def test_math_gold_rationale_grades_correct_and_a_wrong_answer_does_not(tmp_path):
    path = write_records(tmp_path / "m.jsonl", [
        {"problem": "P", "solution": r"So $x = \boxed{\frac{1}{2}}$."},
        {"problem": "P", "solution": r"Thus $\boxed{12}$."},
    ])
    task = MathTask()
    for problem in task.load("test", path):
        assert task.is_correct(problem.solution, problem.answer)
    assert not task.is_correct("The answer is 13", "12")


# --------------------------------------------------------------------------- arith


SMALL = dict(train_size=300, validation_size=60, test_size=60)


def recompute(problem) -> tuple[list[int], list[str]]:
    """Check every line of an arith rationale; return the numbers the question should name."""
    lines = problem.solution.split("\n")
    start = re.fullmatch(r"\w+ starts with (\d+) \w+\.", lines[0])
    assert start, lines[0]
    value, numbers, ops = int(start.group(1)), [int(start.group(1))], []
    for line in lines[1:-1]:
        m = STEP_LINE.fullmatch(line)
        assert m, line
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        assert a == value
        assert c == {"+": a + b, "-": a - b, "*": a * b}[op], line
        value = c
        numbers.append(b)
        ops.append(op)
    assert lines[-1] == f"The answer is {value}" and problem.answer == str(value)
    return numbers, ops


def test_arith_rationales_are_correct_and_match_their_questions():
    task = ArithTask(**SMALL)
    for split in ("train", "validation", "test"):
        for problem in task.load(split):
            numbers, _ = recompute(problem)
            assert [int(n) for n in re.findall(r"\d+", problem.question)] == numbers
            assert problem.question.endswith("?")
            assert task.split_steps(problem.solution) == problem.solution.split("\n")
            assert task.is_correct(problem.solution, problem.answer)
            assert not task.is_correct(problem.solution, str(int(problem.answer) + 1))


def test_arith_is_deterministic_and_seeded():
    first = ArithTask(seed=1, **SMALL).load("train")
    assert first == ArithTask(seed=1, **SMALL).load("train")
    second = ArithTask(seed=2, **SMALL).load("train")
    assert [p.question for p in first] != [p.question for p in second]


def test_arith_splits_have_the_asked_sizes_never_overlap_and_are_prefix_stable():
    task = ArithTask(**SMALL)
    splits = {s: task.load(s) for s in ("train", "validation", "test")}
    assert {s: len(p) for s, p in splits.items()} == {"train": 300, "validation": 60, "test": 60}
    assert task.last_load_stats.loaded == 60
    keys = {s: {p.solution.split("\n", 1)[1] for p in ps} for s, ps in splits.items()}
    assert keys["train"].isdisjoint(keys["test"]) and keys["train"].isdisjoint(keys["validation"])
    assert keys["validation"].isdisjoint(keys["test"])
    ids = [p.id for ps in splits.values() for p in ps]
    assert len(set(ids)) == len(ids) and splits["test"][0].id == "arith:test:0"
    for split, problems in splits.items():
        for p in problems:
            numbers, ops = recompute(p)
            key = str(numbers[0]) + "".join(f"{op}{n}" for op, n in zip(ops, numbers[1:]))
            assert split_of(key) == split
    # more training data, or another seed's splits, never changes or leaks into the test set
    bigger = ArithTask(train_size=900, validation_size=0, test_size=30)
    assert bigger.load("test") == splits["test"][:30]
    other_train = {p.solution.split("\n", 1)[1] for p in ArithTask(seed=5, **SMALL).load("train")}
    assert other_train.isdisjoint(keys["test"])
    with pytest.raises(ValueError, match="splits"):
        task.load("dev")
    share = sum(split_of(str(k)) == "test" for k in range(20_000)) / 20_000
    assert 0.09 < share < 0.11  # the documented 10% test share


def test_arith_knobs_are_respected():
    task = ArithTask(min_steps=3, max_steps=3, min_operand=10, max_operand=20,
                     operations=["+", "*"], max_multiplier=3, max_value=500, seed=4, **SMALL)
    seen_ops = set()
    for problem in task.load("train"):
        numbers, ops = recompute(problem)
        assert len(ops) == 3 and 10 <= numbers[0] <= 20
        for op, n in zip(ops, numbers[1:]):
            assert (2 <= n <= 3) if op == "*" else (10 <= n <= 20)
        values = [int(line.rsplit(" ", 1)[1]) for line in problem.solution.split("\n")[1:-1]]
        assert all(1 <= v <= 500 for v in values)
        seen_ops.update(ops)
    assert seen_ops == {"+", "*"}
    assert task.knobs["operations"] == ["+", "*"] and task.knobs["train_size"] == 300
    subtraction = ArithTask(operations=["-"], min_steps=2, max_steps=2, **SMALL)
    assert all(int(p.answer) >= 1 for p in subtraction.load("train"))


@pytest.mark.parametrize("knobs", [
    dict(min_steps=0), dict(min_steps=3, max_steps=2), dict(min_operand=0),
    dict(max_operand=2000), dict(operations=["/"]), dict(operations=[]),
    dict(operations=["+", "+"]), dict(max_multiplier=1), dict(test_size=-1),
])
def test_arith_rejects_bad_knobs(knobs):
    with pytest.raises(ValueError):
        ArithTask(**knobs)


def test_arith_says_when_knobs_allow_too_few_problems():
    task = ArithTask(min_steps=1, max_steps=1, min_operand=2, max_operand=3,
                     operations=["+"], train_size=50, validation_size=0, test_size=0)
    with pytest.raises(ValueError, match="too few distinct problems"):
        task.load("train")


def test_arith_reads_gsm8k_layout_files(tmp_path):
    path = write_records(tmp_path / "arith.jsonl", [
        {"query": "Ava has 3 coins. She finds 2 more.", "response": "3 + 2 = 5\n#### 5"}])
    task = ArithTask(**SMALL)
    (problem,) = task.load("test", path)
    assert (problem.id, problem.solution, problem.answer) == (
        "arith:1", "3 + 2 = 5\nThe answer is 5", "5")


def test_arith_first_wrong_step_compares_with_the_canonical_rationale(tmp_path):
    task = ArithTask(**SMALL)
    problem = next(p for p in task.load("train") if len(p.solution.split("\n")) >= 4)
    gold = task.split_steps(problem.solution)
    assert task.first_wrong_step(problem, gold) is None
    assert task.first_wrong_step(problem, [" " + gold[0] + "  ", *gold[1:]]) is None  # whitespace aside
    wrong = [*gold[:2], gold[2] + "1", *gold[3:]]
    assert task.first_wrong_step(problem, wrong) == 3
    assert task.first_wrong_step(problem, gold[:2]) == 3  # stopped early
    assert task.first_wrong_step(problem, [*gold, "more"]) == len(gold) + 1
    # Rationales read from a file are free text, and other tasks have no canonical form.
    path = write_records(tmp_path / "a.jsonl", [{"query": problem.question, "response": problem.solution}])
    (from_file,) = ArithTask(**SMALL).load("test", path)
    assert ArithTask(**SMALL).first_wrong_step(from_file, wrong) is None
    assert GSM8KTask().first_wrong_step(problem, wrong) is None


# --------------------------------------------------------------------------- real GSM8K


@pytest.mark.skipif(not (REAL_GSM8K / "test.jsonl").is_file(),
                    reason=f"real GSM8K not found at {REAL_GSM8K} (optional ../shared data)")
def test_real_gsm8k_test_set_loads_and_every_gold_rationale_grades_correct():
    path = REAL_GSM8K / "test.jsonl"
    records = sum(1 for line in path.open(encoding="utf-8") if line.strip())
    task = GSM8KTask()
    problems = task.load("test", path)
    assert len(problems) == records and task.last_load_stats.num_skipped == 0
    wrong = [p.id for p in problems if not task.is_correct(p.solution, p.answer)]
    assert wrong == [], f"{len(wrong)} of {len(problems)} gold rationales graded wrong: {wrong[:5]}"
    assert not any("<<" in p.solution or "####" in p.solution for p in problems)
