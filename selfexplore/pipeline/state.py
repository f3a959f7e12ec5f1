"""`state.json`: which units of work of a run are complete, so a rerun continues from there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from selfexplore.io import read_json, write_json


class RunStateError(RuntimeError):
    """The run directory belongs to another configuration."""


class RunState:
    """Completed units (`"round_1/rft"` ...) with their results, persisted atomically.

    A unit is marked complete only after all its files are written, so a kill at any point
    leaves either a finished unit or one that is redone (stages inside resume from shards).
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any], force: bool = False) -> None:
        self.path = Path(run_dir) / "state.json"
        self.fingerprint = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
        self.units: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            saved = read_json(self.path)
            if saved.get("config_sha256") != self.fingerprint and not force:
                raise RunStateError(
                    f"{self.path.parent} was made by a different configuration (state.json config_sha256 "
                    f"{saved.get('config_sha256', '?')[:12]} != {self.fingerprint[:12]}); use another run_dir, "
                    "or --force to continue it anyway (completed units are kept)")
            self.units = saved.get("units", {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.path.parent / "config.json", config)
        self._save()

    def done(self, unit: str) -> bool:
        return unit in self.units

    def result(self, unit: str) -> dict[str, Any]:
        return self.units[unit]

    def complete(self, unit: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
        self.units[unit] = result or {}
        self._save()
        return self.units[unit]

    def _save(self) -> None:
        write_json(self.path, {"config_sha256": self.fingerprint, "units": self.units})
