"""Relations in MATH answers, read at the string level (no sympy): labels, equality chains,
equations and inequalities.

`normalize_math` has already rewritten every relation to one character (= < > ≤ ≥ ≠ ≈ ∈), so
a relation is found by a linear scan for those characters outside brackets.

How an answer with a relation is read:
* a label is a name, not a value: a variable, subscripted name, function value, word, or a
  quotient, ratio or tuple of those ('x', 'k_1', 'f(x)', 'AB', '\\frac{NO}{BO}',
  'V_{1}:V_{2}', '(p,q)'); 'LABEL = V', 'V = LABEL' and 'LABEL ∈ S' state the value V (or S);
* an equality chain of three or more parts is a computation, its value the last part
  ('x = 5+5+1 = 11' states 11); an '≈' tail after an exact value is dropped, and a lone
  'x ≈ 11' states 11;
* any other two-part equality ('2x+4y-3=0', '7 = 11a+c') is an equation, never a value;
* an inequality in one label (or its negative, or its absolute value) against bounds is the
  set of values it allows, written as an interval ('-2 ≤ x ≤ 7' is [-2,7], '-x > -1' is
  (-∞,1), '1 ≤ |z| ≤ 2' is [-2,-1] ∪ [1,2]).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from selfexplore.grading.latex_parser import GREEK
from selfexplore.grading.numbers import plain_number

#: Relation characters written by normalize_math; '≈' and '∈' are read as '='-like.
RELATION_CHARS = "=<>≤≥≠≈∈"
_ASCENDING = {"<": ")", "≤": "]"}  # upper-end bracket of x op bound
_MIRROR = {"<": ">", ">": "<", "≤": "≥", "≥": "≤", "=": "=", "≠": "≠", "≈": "≈"}
_SUBSCRIPT_RE = re.compile(r"_(?:\{[^{}]*\}|[A-Za-z0-9])")
_COMMAND_RE = re.compile(r"\\([A-Za-z]+)")
_LABEL_COMMANDS = GREEK | {"frac", "overline", "angle", "vec", "hat", "bar", "triangle"}
_LABEL_CHARS = frozenset("{}(),:'")
_INFINITY = "\\infty"


@dataclass(frozen=True)
class Relation:
    """An answer split at its top-level relation characters: parts[i] ops[i] parts[i+1]."""

    parts: tuple[str, ...]
    ops: tuple[str, ...]


def split_relation(s: str) -> Relation:
    """Split `s` at relation characters outside (), [] and {}."""
    parts: list[str] = []
    ops: list[str] = []
    depth = start = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and c in RELATION_CHARS:
            parts.append(s[start:i])
            ops.append(c)
            start = i + 1
    parts.append(s[start:])
    return Relation(tuple(parts), tuple(ops))


def is_label(s: str) -> bool:
    """Whether `s` names a quantity rather than giving a value (see the module docstring):
    letters, Greek letters, subscripts (digits allowed there only), and the punctuation of
    function values, quotients, ratios and tuples; no digits, signs or operators."""
    if not s:
        return False
    body = _SUBSCRIPT_RE.sub("", s)
    for m in _COMMAND_RE.finditer(body):
        if m.group(1) not in _LABEL_COMMANDS:
            return False
    body = _COMMAND_RE.sub("x", body)
    return (any(c.isascii() and c.isalpha() for c in body)
            and all((c.isascii() and c.isalpha()) or c in _LABEL_CHARS for c in body))


def label_key(label: str) -> str:
    """Labels compare without braces and case ('V_{1}' is 'v_1', 'P(x)' is 'p(x)')."""
    return label.replace("{", "").replace("}", "").lower()


def value_of(rel: Relation) -> tuple[str | None, str] | None:
    """(label or None, value) when `rel` states a value, None for equations and inequalities."""
    if not rel.ops:
        return None, rel.parts[0]
    parts, ops = list(rel.parts), list(rel.ops)
    if "≈" in ops:
        cut = ops.index("≈")
        if cut > 0:  # 'x = 1/3 ≈ 0.33': the exact value is the answer
            parts, ops = parts[:cut + 1], ops[:cut]
        else:
            ops[0] = "="
    if any(not p for p in parts):
        return None
    if len(ops) == 1 and ops[0] == "∈":
        return (parts[0], parts[1]) if is_label(parts[0]) else None
    if any(op != "=" for op in ops):
        return None
    if len(parts) >= 3:
        return (parts[0] if is_label(parts[0]) else None), parts[-1]
    if is_label(parts[0]):
        return parts[0], parts[1]
    if is_label(parts[1]):
        return parts[1], parts[0]
    return None


def _negated(s: str) -> str:
    return s[1:] if s.startswith("-") else f"-({s})"


def _interval(lo: str, lo_op: str | None, hi: str, hi_op: str | None) -> tuple[str, str, str, str]:
    """(open bracket, low, high, close bracket) for lo lo_op x hi_op hi (ops '<' or '≤';
    None for an unbounded end)."""
    left = "[" if lo_op == "≤" else "("
    right = _ASCENDING[hi_op] if hi_op else ")"
    return left, lo if lo_op else f"-{_INFINITY}", hi if hi_op else _INFINITY, right


def _flip(piece: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
    """The interval of -x given the interval of x."""
    left, lo, hi, right = piece
    return ("[" if right == "]" else "("), _negated(hi), _negated(lo), ("]" if left == "[" else ")")


def _ascending(rel: Relation) -> Relation | None:
    """`rel` rewritten with only < and ≤ (mirrored if written with > and ≥), else None."""
    if all(op in "<≤" for op in rel.ops):
        return rel
    if all(op in ">≥" for op in rel.ops):
        return Relation(rel.parts[::-1], tuple(_MIRROR[op] for op in reversed(rel.ops)))
    return None


def _names_quantity(s: str) -> bool:
    """A label, possibly negated or inside |...|: the side of an inequality that varies."""
    return is_label(s.lstrip("-|").rstrip("|"))


def intervals_of(rel: Relation) -> list[tuple[str, str, str, str]] | None:
    """The union of intervals (see `_interval`) allowed by a one-label inequality, else None."""
    if not 1 <= len(rel.ops) <= 2:
        return None
    asc = _ascending(rel)
    if asc is None or not all(asc.parts):
        return None
    parts, ops = asc.parts, asc.ops
    if len(parts) == 3:
        lo, var, hi = parts
        bounds: tuple[str | None, str | None, str | None, str | None] = (lo, ops[0], hi, ops[1])
        if _names_quantity(lo) or _names_quantity(hi):
            return None
    elif _names_quantity(parts[0]) and not _names_quantity(parts[1]):
        var, bounds = parts[0], (None, None, parts[1], ops[0])
    elif _names_quantity(parts[1]) and not _names_quantity(parts[0]):
        var, bounds = parts[1], (parts[0], ops[0], None, None)
    else:
        return None  # 'x < y' relates two names: not a set of values
    lo, lo_op, hi, hi_op = bounds
    piece = _interval(lo or "", lo_op, hi or "", hi_op)
    if is_label(var):
        return [piece]
    if var.startswith("-") and is_label(var[1:]):
        return [_flip(piece)]
    if len(var) > 2 and var[0] == var[-1] == "|" and is_label(var[1:-1]) and hi_op:
        return _abs_intervals(lo, lo_op, hi or "", hi_op)
    return None


def _abs_intervals(lo: str | None, lo_op: str | None, hi: str,
                   hi_op: str) -> list[tuple[str, str, str, str]] | None:
    """lo ≤ |x| ≤ hi as two mirrored intervals (one when there is no positive lower bound)."""
    if lo is None:
        return [_interval(_negated(hi), hi_op, hi, hi_op)]
    low = plain_number(lo)
    if low is None or low <= 0:
        return None
    upper = _interval(lo, lo_op, hi, hi_op)
    return [_flip(upper), upper]


def mirrored(rel: Relation) -> Relation:
    """The same relation read right to left ('5 ≥ x' is 'x ≤ 5')."""
    return Relation(rel.parts[::-1], tuple(_MIRROR.get(op, op) for op in reversed(rel.ops)))
