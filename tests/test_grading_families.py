"""MATH answer families of grader math-3 (docs/grading.md): each with its false cases."""

from __future__ import annotations

import pytest

import selfexplore.grading as grading
from selfexplore.grading import extract_answer, is_equiv
from selfexplore.grading.extract import boxed_contents

LONG = 30.0  # verdicts, not speed, are under test here


def equiv(pred: str, gold: str, **kwargs: object) -> bool:
    return is_equiv(pred, gold, "math", timeout=LONG, **kwargs)


@pytest.mark.parametrize("pred, gold, expected", [
    ("\\cfrac{1}{3}", "1/3", True), ("\\dfrac{1}{3}", "1/3", True), ("\\tfrac{1}{3}", "1/3", True),
    ("\\cfrac{1}{3}", "1/4", False),
])
def test_fraction_spellings(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("5 \\geq x", "x \\leq 5", True), ("-x > -1", "x < 1", True), ("-x >= -1", "x <= 1", True),
    ("x \\gt 5", "x > 5", True), ("x \\neq 3", "x != 3", True), ("y > x", "x < y", True),
    ("x < 5", "x > 5", False), ("x \\leq 5", "x \\geq 5", False), ("x > -1", "x < 1", False),
    ("x < 1", "x \\leq 1", False), ("x < y", "x > y", False),
])
def test_relations_and_their_mirrors(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("(3,2)", "(p,q)=(3,2)", True), ("\\frac{1}{\\sqrt{6}}", "\\frac{NO}{BO}=\\frac{1}{\\sqrt{6}}", True),
    ("11:21", "V_{1}:V_{2}=11:21", True), ("4, 5", "AB=4,CD=5", True), ("2", "f(3) = 2", False),
    ("p(x) = 1", "P(x) = 1", True), ("1, 2, 3", "n=1, 2, 3", True),
    ("x = 5+5+1 = 7 = 11", "x = 11", True), ("x = 1/3 \\approx 0.33", "\\frac13", True),
    ("x \\approx 11", "11", True),
    ("(3,1)", "(p,q)=(3,2)", False), ("11:20", "V_{1}:V_{2}=11:21", False),
    ("4, 6", "AB=4,CD=5", False), ("11a+c", "7 = 11a+c", False), ("1", "2x + z = 1", False),
    ("y = 5", "x = 5", False), ("a_3 = 19, a_{37} = 2", "a_3 = 2, a_{37} = 19", False),
])
def test_labelled_answers(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("(7,11),\\ (11,7)", "(11,7)or(7,11)", True), ("\\{-12, -11, -10\\}", "-12;-11;-10", True),
    ("{-2021, 2021}", "\\pm 2021", True), ("6 \\text{ and } 8", "8, 6", True),
    ("(1,2), (1,2), (2,1)", "(2,1), (1,2)", True), ("\\boxed{1}, \\boxed{2}", "\\{1, 2\\}", True),
    ("(7,11)", "(11,7)or(7,11)", False), ("\\{-12, -11\\}", "-12;-11;-10", False),
    ("2021", "\\pm 2021", False), ("(1,2)", "\\{1, 2\\}", False), ("(3,1)", "{1,3}", False),
])
def test_sets_of_solutions_in_any_order_or_separator(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("x \\in [-2,7]", "-2 \\le x \\le 7", True), ("(-793, 10)", "-793 < a < 10", True),
    ("(0,1)", "0<f(x)<1", True), ("[2, \\infty)", "k \\ge 2", True),
    ("(-\\infty, 1)", "-x > -1", True), ("(-3, 3)", "|x| < 3", True),
    ("z \\in [-\\frac{3}{2}, -1] \\cup [1, \\frac{3}{2}]", "1 \\leq |z| \\leq \\frac{3}{2}", True),
    ("x \\in (-\\infty, 3) \\cup (5, \\infty)", "(5,\\infty)\\cup(-\\infty,3)", True),
    ("x \\in [-2,7)", "-2 \\le x \\le 7", False), ("(-2, 7]", "-2 \\le x \\le 7", False),
    ("[2, \\infty)", "k > 2", False), ("(1, \\infty)", "-x > -1", False),
    ("x \\in [1,2]", "[1,2)", False),
])
def test_intervals_and_inequalities(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, decimals, expected", [
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", 2, True),
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", None, False),   # no stated rounding
    ("(0.6,2.6667)", "(\\frac{3}{5},\\frac{8}{3}]", 2, False),      # a different bracket
    ("(0.6,2.65]", "(\\frac{3}{5},\\frac{8}{3}]", 2, False),
    ("1.41", "\\sqrt{2}", 2, True), ("1.41", "\\sqrt{2}", 3, False), ("3", "3.004", 2, True),
])
def test_stated_rounding(pred: str, gold: str, decimals: int | None, expected: bool) -> None:
    assert equiv(pred, gold, decimals=decimals) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("y=-\\frac{1}{2}x+\\frac{3}{4}", "2x+4y-3=0", True), ("-34x-45y+20z-100=0", "34x+45y-20z+100=0", True),
    ("x^2/16 + y^2/12 = 1/4", "x^2/4 + y^2/3 = 1", True), ("b = a", "a = b", True),
    ("2x+4y+3=0", "2x+4y-3=0", False), ("x + y - z + 2 = 0", "5x - 7y + 11z + 4 = 0", False),
    ("x^2 = y^2", "x = y", False), ("0 = 0", "2x+4y-3=0", False),
])
def test_equations_up_to_a_factor(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, decimals, expected", [
    ("\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}",
     "(\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5}\\end{pmatrix})", 2, True),
    ("\\begin{bmatrix}0.333333333\\\\0.2\\end{bmatrix}",
     "\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5}\\end{pmatrix}", None, True),
    ("\\begin{pmatrix}0.34\\\\0.2\\end{pmatrix}",
     "\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5}\\end{pmatrix}", 2, False),
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 5\\end{pmatrix}", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}",
     None, False),
])
def test_matrices_with_rounded_entries(pred: str, gold: str, decimals: int | None,
                                       expected: bool) -> None:
    assert equiv(pred, gold, decimals=decimals) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("28 percent", "28\\%", True), ("28 pct", "28\\%", True), ("28 %", "28\\%", True),
    ("29 percent", "28\\%", False), ("28", "0.28", False),
])
def test_percent_in_words(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


@pytest.mark.parametrize("pred, gold, expected", [
    ("f(y)", "f(x)", False), ("f(x)", "f(x)", True),                  # strict: names matter
    ("\\frac{1}{3},", "\\frac{1}{3}", True), ("1, 2, 3, \\dots", "1, 2, 3", False),
    ("1, 2, 3, ...", "1, 2, 3", False), ("-2 \\\\le x \\\\le 7", "x \\in [-2, 7]", True),
])
def test_strict_names_punctuation_and_escapes(pred: str, gold: str, expected: bool) -> None:
    assert equiv(pred, gold) is expected


def test_outermost_boxes_are_the_answer() -> None:
    text = "first \\boxed{\\boxed{1}, \\boxed{2}} then \\boxed{} and \\boxed{3"
    assert [c for _, c in boxed_contents(text)] == ["\\boxed{1}, \\boxed{2}"]
    assert extract_answer(text, "math") == "\\boxed{1}, \\boxed{2}"
    assert equiv(extract_answer(text, "math") or "", "\\{1, 2\\}")


@pytest.mark.parametrize("rationale, gold, expected", [
    # Math-Verify's rule: adjacent boxes with only ',', ';', 'and', 'or' or spacing between are one answer
    ("The integers are \\boxed{-2} and \\boxed{1}.", "\\boxed{1, -2}", True),
    ("\\(\\boxed{1}\\) and \\(\\boxed{-2}\\).", "-2,1", True),
    ("$\\boxed{1}\\boxed{2}$", "1,2", True),
    ("So $$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$", "(6, 2), (2, 2)", True),
    ("\\boxed{1},\\boxed{2},\\boxed{3}", "\\{1,2,3\\}", True),
    ("\\boxed{1} or \\boxed{2}", "1", False),
    # prose between boxes: a revision, only the last box answers
    ("First I got \\boxed{5}. Checking again, it is \\boxed{6}.", "6", True),
    ("First I got \\boxed{5}. Checking again, it is \\boxed{6}.", "5, 6", False),
])
def test_an_answer_spread_over_several_boxes(rationale: str, gold: str, expected: bool) -> None:
    assert equiv(extract_answer(rationale, "math") or "", gold) is expected


def test_several_boxes_stay_one_box_for_gsm8k() -> None:
    assert extract_answer("\\boxed{3} and \\boxed{4}", "gsm8k") == "4"


@pytest.mark.parametrize("pred, gold, decimals, expected", [
    # Math-Verify's rule (and ours): a rounding is the caller's, never guessed from the prediction;
    # without one only ~6 places of agreement count, element by element
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", None, False),
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", 2, True),
    ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]", 4, True),
    ("(0.6,2.67]", "(\\frac{3}{5},\\frac{8}{3}]", 4, False),
    ("(0.333333, 2)", "(\\frac13, 2)", None, True),
    ("[0.33, 1)", "[\\frac13, 1]", 2, False),  # the brackets still count
    ("\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5}\\end{pmatrix}",
     None, False),
    ("\\begin{pmatrix}0.33\\\\0.2\\end{pmatrix}", "\\begin{pmatrix}\\frac{1}{3}\\\\ \\frac{1}{5}\\end{pmatrix}",
     4, False),
])
def test_rounded_decimals_inside_intervals_and_matrices(pred: str, gold: str, decimals: int | None,
                                                         expected: bool) -> None:
    assert equiv(pred, gold, decimals=decimals) is expected


def test_decimals_must_be_a_small_non_negative_integer() -> None:
    for bad in (-1, 2.5, 31):
        with pytest.raises(ValueError):
            is_equiv("1", "1.0", "math", decimals=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, gold", [
    ("The answer is 1e999", "1"), ("The answer is 1e3", "1000"), ("The answer is 2.5e-3.", "0.0025"),
    ("The answer is 5 apples", "5"), ("#### 1,000", "1000"), ("The answer is 1e9999", "1"),
])
def test_gsm8k_extraction_and_grading_agree(text: str, gold: str) -> None:
    answer = extract_answer(text, "gsm8k")
    assert answer is not None
    segment = text.split("is", 1)[1] if "is" in text else text.split("####")[1]
    assert is_equiv(answer, gold, "gsm8k") is is_equiv(segment.strip(), gold, "gsm8k")


def test_gsm8k_huge_exponent_is_not_the_leading_digit() -> None:
    assert extract_answer("The answer is 1e999", "gsm8k") == "1e999"
    assert not is_equiv(extract_answer("The answer is 1e999", "gsm8k"), "1", "gsm8k")


def test_grader_version_is_exported() -> None:
    assert grading.GRADER_VERSION == "math-3"
    assert "GRADER_VERSION" in grading.__all__
