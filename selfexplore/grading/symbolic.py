"""Symbolic equivalence of MATH answers with sympy.

Runs inside the hard time limit of timeout.py (`math_equiv` is what the worker process runs).
Expressions come only from our own parser (latex_parser.py), never from sympy's string parsers
(`sympify` / `parse_expr` call eval).

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
With a stated rounding (`decimals`), constants that round alike to that many places are equal.

Answers with relations (see relations.py): two stated values compare as values when their
labels agree ('x=5' is '5'); two equations, or an equation and a labelled value, are equal when
one's (left - right) is a constant non-zero multiple of the other's, checked at the same random
points ('2x+4y-3=0' is 'y=-x/2+3/4'); an equation is never a bare value ('7=11a+c' is not
'11a+c'); other relations must have the same parts and relation, read in either direction.
"""

from __future__ import annotations

import functools
import random
import time
from fractions import Fraction

import sympy

from selfexplore.grading.latex_parser import ParseError, parse_math
from selfexplore.grading.numbers import REL_TOL, numbers_close, rounded
from selfexplore.grading.relations import Relation, label_key, mirrored, split_relation, value_of
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


def _points(symbols: list[sympy.Symbol]) -> list[dict[sympy.Symbol, sympy.Rational]]:
    """The same pseudo-random non-integer points of both signs for every comparison."""
    rng = random.Random(0)
    return [{s: sympy.Rational(rng.choice((-1, 1)) * rng.randint(20, 180), 97) for s in symbols}
            for _ in range(_POINT_TRIES)]


def _spot_check(a: sympy.Basic, b: sympy.Basic, symbols: list[sympy.Symbol]) -> bool | None:
    """False on a disagreement, True when enough points agree, None when too few evaluate."""
    agreed = 0
    for point in _points(symbols):
        va, vb = _value(a, point), _value(b, point)
        if va is None or vb is None:
            continue
        if not _close(va, vb, _TOLERANCE):
            return False
        agreed += 1
        if agreed >= _POINTS_NEEDED:
            return True
    return None


def _round_alike(x: Value, y: Value, decimals: int) -> bool:
    return all(rounded(Fraction(str(p)), decimals) == rounded(Fraction(str(q)), decimals)
               for p, q in zip(x, y))


def exprs_equal(a: sympy.Basic, b: sympy.Basic, deadline: float,
                decimals: int | None = None) -> bool:
    """Whether two parsed answers denote the same value (see the module docstring)."""
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return numbers_close(Fraction(int(a.p), int(a.q)), Fraction(int(b.p), int(b.q)), decimals)
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        va, vb = _value(a), _value(b)
        if va is None or vb is None:
            return _proves_equal(a, b, deadline)
        if decimals is not None and _round_alike(va, vb, decimals):
            return True
        exact = a.is_Integer or b.is_Integer
        return _close(va, vb, _INTEGER_TOL if exact else _TOLERANCE)
    verdict = _spot_check(a, b, symbols)
    if verdict is None:
        return _proves_equal(a, b, deadline)
    return verdict


def _proportional(a: sympy.Basic, b: sympy.Basic) -> bool:
    """Whether a = k*b for one constant k != 0, at the shared random points."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    ratio: Value | None = None
    agreed = 0
    for point in _points(symbols):
        va, vb = _value(a, point), _value(b, point)
        if va is None or vb is None:
            continue
        if vb == (0, 0) and va == (0, 0):
            continue  # the point happens to lie on both curves
        if vb == (0, 0) or va == (0, 0):
            return False
        size = vb[0] ** 2 + vb[1] ** 2  # va / vb as (real, imaginary)
        here = ((va[0] * vb[0] + va[1] * vb[1]) / size, (va[1] * vb[0] - va[0] * vb[1]) / size)
        if ratio is not None and not _close(here, ratio, _TOLERANCE):
            return False
        ratio = here
        agreed += 1
    return agreed >= _POINTS_NEEDED


def _equation(relation: Relation) -> sympy.Basic | None:
    """left - right of a two-part equality (a labelled value counts), else None."""
    if relation.ops != ("=",):
        return None
    left, right = (parse_math(p) for p in relation.parts)
    return left - right


def _relations_equal(x: Relation, y: Relation, deadline: float, decimals: int | None) -> bool:
    vx, vy = value_of(x), value_of(y)
    if vx is not None and vy is not None:
        (lx, ax), (ly, ay) = vx, vy
        if lx is None or ly is None or label_key(lx) == label_key(ly):
            return ax == ay or exprs_equal(parse_math(ax), parse_math(ay), deadline, decimals)
    ex, ey = _equation(x), _equation(y)
    if ex is not None and ey is not None:
        return _proportional(ex, ey)
    if vx is not None or vy is not None:
        return False  # a value is never an equation or an inequality
    return any(x.ops == other.ops and all(
        exprs_equal(parse_math(p), parse_math(q), deadline, decimals)
        for p, q in zip(x.parts, other.parts)) for other in (y, mirrored(y)))


def scalar_equiv(x: str, y: str, deadline: float, decimals: int | None = None) -> bool:
    """Two normalised scalar answers, relations included: equal strings, else equal values."""
    if x == y:
        return True
    try:
        return _relations_equal(split_relation(x), split_relation(y), deadline, decimals)
    except ParseError:
        return False


def math_equiv(a: str, b: str, budget: float, decimals: int | None = None) -> bool:
    """Whether two normalised MATH answers are equivalent, composite answers included.

    Any failure inside sympy on odd input counts as 'not equivalent', never as a crash.
    """
    deadline = time.monotonic() + budget
    try:
        return compare(parse_structure(a), parse_structure(b),
                       lambda x, y: scalar_equiv(x, y, deadline, decimals)) is True
    except Exception:  # noqa: BLE001 - grading must answer, not raise
        return False
