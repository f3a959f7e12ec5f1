"""Symbolic equivalence of MATH answers with sympy.

Runs inside the hard time limit of timeout.py (`math_equiv` is what the worker process runs).
Expressions come only from our own parser (latex_parser.py), never from sympy's string parsers.

How two scalars are compared:
1. identical sympy trees, or two exact rationals compared by `numbers_close` (integers exact,
   other values within REL_TOL);
2. constants (no variables): evaluated to 30 significant digits; integers must agree to 25
   digits, anything else within REL_TOL (so 0.707107 matches \\frac{\\sqrt2}{2});
3. expressions with variables: evaluated at random points (both signs, non-integers) at
   30 digits, the standard randomized identity test: any clear disagreement proves the answers
   differ, agreement at every point accepts them;
4. when numbers cannot decide (values undefined at the points, unevaluable constants),
   `simplify(a - b) == 0` is tried as a proof, within half of the remaining time.
"""

from __future__ import annotations

import functools
import random
import time
from fractions import Fraction

import sympy

from selfexplore.grading.latex_parser import ParseError, parse_math
from selfexplore.grading.normalize import strip_lhs
from selfexplore.grading.numbers import REL_TOL, numbers_close
from selfexplore.grading.structure import compare, parse_structure
from selfexplore.grading.timeout import within

_DIGITS = 30
_INTEGER_TOL = sympy.Float("1e-25")
_TOLERANCE = sympy.Float(float(REL_TOL))
_POINT_TRIES = 8
_POINTS_NEEDED = 4
_SIMPLIFY_SHARE = 0.5

Value = tuple[sympy.Expr, sympy.Expr]


@functools.cache
def warm_up() -> None:
    """Load sympy's lazily imported simplification and evaluation code once, outside any time
    limit (about a second), so the first answer graded in a process is not cut short by it."""
    x = sympy.Symbol("x")
    sympy.simplify(sympy.sin(x) ** 2 + sympy.cos(x) ** 2 - sympy.sqrt(x ** 2) / (x + 1))
    (sympy.sqrt(2) * x + sympy.oo).evalf(_DIGITS, subs={x: sympy.Rational(1, 3)})


def _value(expr: sympy.Basic,
           point: dict[sympy.Symbol, sympy.Rational] | None = None) -> Value | None:
    """(real, imaginary) parts at `point` to _DIGITS digits, or None if not a finite number."""
    v = expr.evalf(_DIGITS, subs=point) if point else expr.evalf(_DIGITS)
    re_part, im_part = v.as_real_imag()
    if not (re_part.is_Number and im_part.is_Number and re_part.is_finite and im_part.is_finite):
        return None
    return re_part, im_part


def _close(x: Value, y: Value, tol: sympy.Float) -> bool:
    d2 = (x[0] - y[0]) ** 2 + (x[1] - y[1]) ** 2
    scale2 = max(x[0] ** 2 + x[1] ** 2, y[0] ** 2 + y[1] ** 2)
    return bool(d2 <= tol ** 2 * scale2)


def _is_zero(expr: sympy.Basic) -> bool:
    return bool(sympy.simplify(expr) == 0)


def _proves_equal(a: sympy.Basic, b: sympy.Basic, deadline: float) -> bool:
    remaining = deadline - time.monotonic()
    return remaining > 0 and within(remaining * _SIMPLIFY_SHARE, _is_zero, a - b) is True


def _spot_check(a: sympy.Basic, b: sympy.Basic, symbols: list[sympy.Symbol]) -> bool | None:
    """False on a disagreement, True when enough points agree, None when too few evaluate."""
    rng = random.Random(0)
    agreed = 0
    for _ in range(_POINT_TRIES):
        point = {s: sympy.Rational(rng.choice((-1, 1)) * rng.randint(20, 180), 97)
                 for s in symbols}
        va, vb = _value(a, point), _value(b, point)
        if va is None or vb is None:
            continue
        if not _close(va, vb, _TOLERANCE):
            return False
        agreed += 1
        if agreed >= _POINTS_NEEDED:
            return True
    return None


def exprs_equal(a: sympy.Basic, b: sympy.Basic, deadline: float) -> bool:
    """Whether two parsed answers denote the same value (see the module docstring)."""
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return numbers_close(Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q)))
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        va, vb = _value(a), _value(b)
        if va is None or vb is None:
            return _proves_equal(a, b, deadline)
        exact = a.is_Integer or b.is_Integer
        return _close(va, vb, _INTEGER_TOL if exact else _TOLERANCE)
    verdict = _spot_check(a, b, symbols)
    if verdict is None:
        return _proves_equal(a, b, deadline)
    return verdict


def scalar_equiv(x: str, y: str, deadline: float) -> bool:
    """Two normalised scalar answers: equal strings, else equal parsed values."""
    if x == y:
        return True
    x, y = strip_lhs(x), strip_lhs(y)
    if x == y:
        return True
    try:
        a, b = parse_math(x), parse_math(y)
    except ParseError:
        return False
    return exprs_equal(a, b, deadline)


def math_equiv(a: str, b: str, budget: float) -> bool:
    """Whether two normalised MATH answers are equivalent, composite answers included.

    Any failure inside sympy on odd input counts as 'not equivalent', never as a crash.
    """
    deadline = time.monotonic() + budget
    try:
        return compare(parse_structure(a), parse_structure(b),
                       lambda x, y: scalar_equiv(x, y, deadline)) is True
    except Exception:  # noqa: BLE001 - grading must answer, not raise
        return False
