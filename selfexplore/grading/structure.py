"""Composite MATH answers: tuples, intervals, sets, unions, matrices and bare lists.

An answer string is split into a small tree whose leaves are scalar answers; two trees are
equal when their shapes match and their leaves are equal under a scalar comparison supplied
by the caller (a cheap numeric one first, then the symbolic one).

How kinds are told apart: \\{...\\} and {...} with commas are sets, and so is a bare list
('-2, 3', also written with 'and', 'or' or ';'); ( ) and [ ] with commas are tuples or
intervals, whose brackets must match exactly; unions and sets compare as sets. A label in front
of a composite value is dropped ('(p,q)=(3,2)', 'x ∈ [1,2]', 'n=1,2,3'); a one-label
inequality becomes its interval ('-2 ≤ x ≤ 7' is '[-2,7]'); 'a ± b' is the set {a+b, a-b}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from selfexplore.grading.relations import RELATION_CHARS, intervals_of, split_relation, value_of

#: Most elements a composite answer may have (keeps the pairwise matching of sets small).
MAX_ITEMS = 64

_MATRIX_RE = re.compile(r"\\begin\{([pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(.*)\\end\{\1\}", re.S)
_UNORDERED = ("set", "union")
_SPECIAL = (",", "\\cup", "\\begin", "{", "\\pm", *RELATION_CHARS)


@dataclass(frozen=True)
class Composite:
    """A composite answer. kind: an interval/tuple bracket pair such as '(]', or 'set' (also a
    bare comma list), 'pm' (the two answers of 'a ± b', a set), 'union', 'matrix', 'row'."""

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


def _collection(kind: str, parts: list[str]) -> Composite:
    """A set or union of `parts`; the two answers of an 'a ± b' item are both members."""
    items: list[Node] = []
    for part in parts[:MAX_ITEMS + 1]:
        node = parse_structure(part)
        items.extend(node.items if isinstance(node, Composite) and node.kind == "pm" else [node])
    return Composite(kind, tuple(items))


def _list_value(items: list[str]) -> str | None:
    """'n=1,2,3' -> '1,2,3': a label on the first item only names the whole list."""
    if any(c in item for item in items[1:] for c in RELATION_CHARS):
        return None
    first = split_relation(items[0])
    value = value_of(first)
    if len(first.ops) != 1 or value is None or value[0] != first.parts[0]:
        return None
    return ",".join((value[1], *items[1:]))


def _relation_node(s: str, relation_value: tuple[str | None, str] | None,
                   pieces: list[tuple[str, str, str, str]] | None) -> Node:
    if relation_value is not None and relation_value[0] is not None:
        node = parse_structure(relation_value[1])
        return node if isinstance(node, Composite) else s  # a labelled scalar stays whole
    if pieces is not None:
        nodes = [Composite(left + right, (lo, hi)) for left, lo, hi, right in pieces]
        return nodes[0] if len(nodes) == 1 else Composite("union", tuple(nodes))
    return s


def parse_structure(s: str) -> Node:
    """The composite tree of a normalised answer string (a plain string when it is a scalar)."""
    if not any(token in s for token in _SPECIAL):
        return s
    items = _split_top(s, ",")
    if len(items) > 1:
        whole = _list_value(items)
        return parse_structure(whole) if whole is not None else _collection("set", items)
    relation = split_relation(s)
    if relation.ops:
        return _relation_node(s, value_of(relation), intervals_of(relation))
    union = _split_top(s, "\\cup")
    if len(union) > 1:
        return _collection("union", union)
    matrix = _MATRIX_RE.fullmatch(s[1:-1] if s[:1] in ("(", "[") and _encloses(s) else s)
    if matrix:  # '(\begin{pmatrix}...\end{pmatrix})' is the matrix itself
        rows = [r for r in matrix.group(2).split("\\\\") if r]
        return Composite("matrix", tuple(
            Composite("row", tuple(r.split("&"))) for r in rows[:MAX_ITEMS + 1]))
    if s.startswith("\\{") and s.endswith("\\}") and _encloses(s[1:]):
        inner = s[2:-2]
        return _collection("set", _split_top(inner, ",") if inner else [])
    if len(s) >= 2 and s[0] + s[-1] in ("{}", "()", "[]", "(]", "[)") and _encloses(s):
        items = _split_top(s[1:-1], ",")
        if len(items) > 1 and s[0] == "{":  # '{1,2}' is a set; brackets make a tuple or interval
            return _collection("set", items)
        if len(items) > 1:
            return Composite(s[0] + s[-1], tuple(parse_structure(p) for p in items[:MAX_ITEMS + 1]))
        return s
    if s.count("\\pm") == 1:
        return Composite("pm", (s.replace("\\pm", "+"), s.replace("\\pm", "-")))
    return s


def _kind(node: Composite) -> str:
    return "set" if node.kind == "pm" else node.kind


def compare(a: Node, b: Node, scalar: Scalar) -> bool | None:
    """Equal (True), different (False) or undecided by `scalar` (None).

    Shapes must match exactly: an interval's open/closed ends matter, '(1,2)' is not '1,2'.
    Sets, bare lists and unions are equal when they have the same members, in any order and
    whatever the repeats.
    """
    if isinstance(a, str) and isinstance(b, str):
        return scalar(a, b)
    if isinstance(a, str) or isinstance(b, str):
        return False
    if _kind(a) != _kind(b) or max(len(a.items), len(b.items)) > MAX_ITEMS:
        return False
    if _kind(a) in _UNORDERED:
        return _same_members(a.items, b.items, scalar)
    if len(a.items) != len(b.items):
        return False
    verdict: bool | None = True
    for x, y in zip(a.items, b.items):
        result = compare(x, y, scalar)
        if result is False:
            return False
        if result is None:
            verdict = None
    return verdict


def _same_members(xs: tuple[Node, ...], ys: tuple[Node, ...], scalar: Scalar) -> bool | None:
    """Every member of each side equals some member of the other (set equality)."""
    table = [[compare(x, y, scalar) for y in ys] for x in xs]
    columns = [list(col) for col in zip(*table)] if table else []
    lines = table + columns
    if len(xs) != len(ys) and not (xs and ys):
        return False
    if any(all(v is False for v in line) for line in lines):
        return False
    if all(any(v is True for v in line) for line in lines):
        return True
    return None
