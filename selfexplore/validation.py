"""Config validation shared by every component: collect every problem, then raise once.

Each config dataclass reports `problems(prefix)` (each naming `prefix.field` and its value),
so a pipeline YAML with a bad value in every block is refused with one error listing all of
them, before anything is written; a component built on its own raises its list here.
"""

from __future__ import annotations


def raise_problems(problems: list[str], what: str) -> None:
    """One ValueError listing every problem (collect, then raise once: the user fixes all in one go)."""
    if problems:
        raise ValueError(f"invalid {what}:\n  - " + "\n  - ".join(problems))


def at_least(problems: list[str], name: str, value: int | float | None, low: int | float,
             optional: bool = False) -> None:
    """Record a problem when `value` is below `low` (None is fine when `optional`)."""
    if value is None and optional:
        return
    if value is None or value < low:
        problems.append(f"{name} must be >= {low}{' (or null for all)' if optional else ''}, got {value!r}")
