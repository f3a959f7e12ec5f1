"""`is_equiv`: is a predicted final answer equivalent to the gold one?

Cheapest test first: equal strings, then exact numbers (no sympy), then, for MATH only, the
symbolic check under a hard time limit. Oversized or deeply nested input is rejected before
any parsing, so every call returns within `timeout` whatever the input.
"""

from __future__ import annotations

import functools
import re

from selfexplore.grading.extract import TASKS
from selfexplore.grading.normalize import bracket_depth, normalize_math
from selfexplore.grading.numbers import gsm8k_values, numbers_close, plain_number
from selfexplore.grading.relations import label_key, split_relation, value_of
from selfexplore.grading.structure import compare, parse_structure
from selfexplore.grading.symbolic import math_equiv, warm_up
from selfexplore.grading.timeout import alarm_usable, run_limited

#: Longer answers are only ever compared as exact strings (real answers are far shorter).
MAX_ANSWER_CHARS = 1000
#: Deeper bracket nesting is only ever compared as exact strings.
MAX_NESTING = 20
#: Most decimal places a stated rounding may have (more is no rounding at all).
MAX_DECIMALS = 30


def _text_key(s: str) -> str:
    return re.sub(r"\s+", " ", s.strip().rstrip(".").strip().lower())


def _gsm8k_equiv(pred: str, gold: str, decimals: int | None) -> bool:
    p, g = gsm8k_values(pred), gsm8k_values(gold)
    if p is not None and g is not None:
        return any(numbers_close(x, y, decimals) for x in p for y in g)
    return _text_key(pred) == _text_key(gold)


def _fast_scalar(x: str, y: str, decimals: int | None) -> bool | None:
    """Equal strings or plain numbers (labels read as in relations.py); None: ask sympy."""
    if x == y:
        return True
    vx, vy = value_of(split_relation(x)), value_of(split_relation(y))
    if vx is None or vy is None:
        return None
    (lx, ax), (ly, ay) = vx, vy
    if lx is not None and ly is not None and label_key(lx) != label_key(ly):
        return None
    if ax == ay:
        return True
    px, py = plain_number(ax), plain_number(ay)
    if px is None or py is None:
        return None
    return numbers_close(px, py, decimals)


class _Undecided(Exception):
    """The symbolic check ran out of time (raised so the cache below does not keep it)."""


@functools.lru_cache(maxsize=8192)
def _symbolic(a: str, b: str, timeout: float, decimals: int | None) -> bool:
    """Cached: explore and RFT grade the same few answers against one gold many times."""
    if alarm_usable():  # in-process check: pay sympy's one-off import cost outside the limit
        warm_up()
    result = run_limited(math_equiv, (a, b, timeout, decimals), timeout)
    if result is None:
        raise _Undecided
    return result is True


def _math_equiv(pred: str, gold: str, timeout: float, decimals: int | None) -> bool:
    px, py = plain_number(pred.strip()), plain_number(gold.strip())
    if px is not None and py is not None:
        return numbers_close(px, py, decimals)
    a, b = normalize_math(pred), normalize_math(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    if bracket_depth(a) > MAX_NESTING or bracket_depth(b) > MAX_NESTING:
        return False
    fast = compare(parse_structure(a), parse_structure(b),
                   lambda x, y: _fast_scalar(x, y, decimals))
    if fast is not None:
        return fast
    try:
        return _symbolic(a, b, timeout, decimals)
    except _Undecided:
        return False


def is_equiv(pred: str | None, gold: str | None, task: str = "gsm8k",
             timeout: float = 1.0, *, decimals: int | None = None) -> bool:
    """Whether answer `pred` is equivalent to `gold` for `task` ('gsm8k' or 'math').

    gsm8k: numbers compared exactly after removing thousands commas, currency, unit words,
    a trailing period and 'x =' ("$1,000.00 dollars" == "1000"); a/b fractions and decimals
    are values ("1/2" == "0.5"); a percentage matches its face value or value/100. Integers
    must match exactly; non-integers within a relative 1e-6. Non-numbers compare as text
    (case and spacing ignored). No symbolic algebra, so no time limit is needed.

    math: LaTeX normalisation (see `normalize_math`), then tuples, intervals (open/closed ends
    matter), sets, unions and matrices element by element, bare lists and sets by their members
    (see `structure`); labels, equations and inequalities as in `relations`; scalars
    by exact number comparison, else symbolically with sympy (see `symbolic`), within
    `timeout` seconds; running out of time counts as not equivalent. The first symbolic check
    in a process also pays a one-off sympy warm-up (or, off the main thread, a worker start) of
    about a second outside that limit, so a cold start never turns a correct answer wrong.

    decimals: the question asks for that many decimal places, so numbers that round alike
    (half up) are equal as well ("0.33" == "1/3" at 2). None (default): no stated rounding.

    None, an empty answer, or an answer over MAX_ANSWER_CHARS that is not identical to the
    gold answer, is never equivalent. Never raises on any string input.
    """
    if task not in TASKS:
        raise ValueError(f"unknown grading task {task!r}; expected one of {TASKS}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    if decimals is not None and not (isinstance(decimals, int) and 0 <= decimals <= MAX_DECIMALS):
        raise ValueError(f"decimals must be an integer in [0, {MAX_DECIMALS}], got {decimals!r}")
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    if pred.strip() == gold.strip():
        return bool(gold.strip())
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return False
    if task == "gsm8k":
        return _gsm8k_equiv(pred, gold, decimals)
    return _math_equiv(pred, gold, timeout, decimals)
