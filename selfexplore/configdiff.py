"""Which settings differ between two configurations, and how that reads in an error message.

One formatter for every guard that refuses a changed configuration: a run directory
(`pipeline.state`) and the shard folders of the sample and explore stages (`shards`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys: {"dpo": {"lr": 1e-6}} -> {"dpo.lr": 1e-6}."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every dotted key whose value differs (missing on one side: None there), compared as JSON
    holds them (a tuple read back from config.json is a list)."""
    a, b = (flatten(json.loads(json.dumps(c, default=str))) for c in (old, new))
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def format_diff(diff: Mapping[str, tuple[Any, Any]]) -> str:
    """'key: old -> new' per entry, in the diff's (sorted) order."""
    return "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in diff.items())
