"""Composite MATH answers: tuples, intervals, sets, unions, matrices and bare lists.

An answer string is split into a small tree whose leaves are scalar answers; two trees are
equal when their shapes match and their leaves are equal under a scalar comparison supplied
by the caller (a cheap numeric one first, then the symbolic one).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

#: Most elements a composite answer may have (keeps the pairwise matching of sets small).
MAX_ITEMS = 64

_MATRIX_RE = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_UNORDERED = ("set", "list")


@dataclass(frozen=True)
class Composite:
    """A composite answer. kind: an interval/tuple bracket pair such as '(]', or 'set', 'list'
    (bare comma list), 'union', 'matrix', 'row'. Sets and bare lists are unordered."""

    kind: str
    items: tuple[Node, ...]


Node = str | Composite
Scalar = Callable[[str, str], "bool | None"]


def _split_top(s: str, sep: str) -> list[str]:
    """Split on `sep` outside (), [], {} (escaped set braces included)."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(sep, i):
            parts.append(s[start:i])
            i += len(sep)
            start = i
            continue
        i += 1
    parts.append(s[start:])
    return parts


def _encloses(s: str) -> bool:
    """Whether the bracket opening s[0] is closed by s[-1] (not earlier)."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def parse_structure(s: str) -> Node:
    """The composite tree of a normalised answer string (a plain string when it is a scalar)."""
    if "," not in s and "\\cup" not in s and "\\begin" not in s and not s.startswith("\\{"):
        return s
    union = _split_top(s, "\\cup")
    if len(union) > 1:
        return Composite("union", tuple(parse_structure(p) for p in union[:MAX_ITEMS + 1]))
    m = _MATRIX_RE.fullmatch(s)
    if m:
        rows = [r for r in m.group(2).split("\\\\") if r]
        return Composite("matrix", tuple(
            Composite("row", tuple(c for c in r.split("&"))) for r in rows[:MAX_ITEMS + 1]))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s[1:]):
        inner = s[2:-2]
        items = _split_top(inner, ",") if inner else []
        return Composite("set", tuple(parse_structure(p) for p in items[:MAX_ITEMS + 1]))
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s):
        items = _split_top(s[1:-1], ",")
        if len(items) > 1:
            return Composite(s[0] + s[-1], tuple(parse_structure(p) for p in items[:MAX_ITEMS + 1]))
        return s
    items = _split_top(s, ",")
    if len(items) > 1:
        return Composite("list", tuple(parse_structure(p) for p in items[:MAX_ITEMS + 1]))
    return s


def compare(a: Node, b: Node, scalar: Scalar) -> bool | None:
    """Equal (True), different (False) or undecided by `scalar` (None).

    Shapes must match exactly: an interval's open/closed ends matter, '(1,2)' is not '1,2'.
    Sets and bare lists ('-2, 3' as the list of all solutions) match in any order.
    """
    if isinstance(a, str) and isinstance(b, str):
        return scalar(a, b)
    if isinstance(a, str) or isinstance(b, str):
        return False
    if a.kind != b.kind or len(a.items) != len(b.items) or len(a.items) > MAX_ITEMS:
        return False
    if a.kind in _UNORDERED:
        return _match_unordered(a.items, b.items, scalar)
    verdict: bool | None = True
    for x, y in zip(a.items, b.items):
        result = compare(x, y, scalar)
        if result is False:
            return False
        if result is None:
            verdict = None
    return verdict


def _match_unordered(xs: tuple[Node, ...], ys: tuple[Node, ...], scalar: Scalar) -> bool | None:
    """Greedy one-to-one matching; enough because answer equivalence is transitive."""
    table = [[compare(x, y, scalar) for y in ys] for x in xs]
    if any(v is None for row in table for v in row):
        return None
    used: set[int] = set()
    for row in table:
        j = next((j for j, v in enumerate(row) if v and j not in used), None)
        if j is None:
            return False
        used.add(j)
    return True
