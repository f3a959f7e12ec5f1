"""`state.json`: which units of work of a run are complete, so a rerun continues from there.

With several processes rank 0 is its only writer and the other ranks poll it to stay in step
(a file poll, not a barrier: no process group exists before the first fit, and rank 0's
sampling can outlast a collective's timeout).

Design notes: docs/design.md#run-state
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from selfexplore.configdiff import config_diff, format_diff
from selfexplore.hashing import text_sha256
from selfexplore.io import read_json, write_json
from selfexplore.pipeline.invalidate import units_to_redo
from selfexplore.pipeline.layout import RunLayout
from selfexplore.ranks import Failure, poll

# Rank 0's current attempt, exported so the ranks Lightning launches from it inherit it.
ATTEMPT_VARIABLE = "SELFEXPLORE_RUN_ATTEMPT"


class RunStateError(RuntimeError):
    """The run directory belongs to another configuration."""


class PipelineError(RuntimeError):
    """A unit cannot go on for a reason the user can act on (what to change is in the message)."""


class RankZeroFailed(RuntimeError):
    """Rank 0 failed, or is gone, while this rank waited for one of its units."""


class RunState:
    """Completed units (`"round_1/rft"` ...) with their results, persisted atomically.

    A unit is marked complete only after all its files are written, so a kill at any point
    leaves either a finished unit or one that is redone (stages inside resume from shards).
    Only the `writer` (rank 0) writes; other ranks read the file and `wait_for` units.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any], force: bool = False,
                 writer: bool = True) -> None:
        self.layout = RunLayout(run_dir)
        self.path = self.layout.state
        self.config = config
        self.fingerprint = text_sha256(json.dumps(config, sort_keys=True, default=str))
        self.force = force
        self.writer = writer
        self.units: dict[str, dict[str, Any]] = {}
        # Units started and not yet finished (outer first), for `selfexplore status` in another process.
        self.running: dict[str, dict[str, Any]] = {}
        self.forced: list[dict[str, Any]] = []  # the history of --force changes, oldest first
        self.redone: list[str] = []  # units this attempt's --force invalidated
        self._launcher = os.getppid()
        if writer:
            self._adopt()
            self.attempt = uuid.uuid4().hex
            os.environ[ATTEMPT_VARIABLE] = self.attempt
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json(self.layout.config, config)
            self._save()  # also clears the failure a previous attempt recorded
        else:
            self._load()
            self.attempt = os.environ.get(ATTEMPT_VARIABLE)

    def _adopt(self) -> None:
        """Take over an existing state.json (rank 0): refuse another config unless `force`.

        With `force`, the units the changed settings invalidate are dropped (and redone), so
        every unit still recorded was computed under the settings it depends on, and
        config.json stays the true record of the run; `forced` keeps what changed when.
        """
        if not self.path.is_file():
            return
        saved = read_json(self.path)
        self.units = saved.get("units", {})
        self.forced = saved.get("forced", [])
        if saved.get("config_sha256") == self.fingerprint or not self.units:
            return  # same config, or nothing completed that another config could have made
        old_path = self.layout.config
        diff = (config_diff(read_json(old_path), self.config) if old_path.is_file()
                else {"(config.json)": ("missing", "")})
        if not self.force:
            raise RunStateError(
                f"{self.path.parent} was made by a different configuration ({format_diff(diff)}); use another "
                "run_dir, or --force to redo the completed units these settings affect")
        self.redone = units_to_redo(list(diff), list(self.units), int(self.config.get("rounds", 1)),
                                   str(self.config.get("rft_init", "base")))
        for unit in self.redone:
            del self.units[unit]
        self.forced.append({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "changed": {k: [a, b] for k, (a, b) in diff.items()}, "redone": self.redone})

    def _load(self) -> dict[str, Any]:
        """Read rank 0's state.json (the other ranks follow it).

        A file of another fingerprint is rank 0's before it adopted this config (ranks that
        torchrun starts together can read it first): nothing in it counts yet.
        """
        if not self.path.is_file():
            return {}
        saved = read_json(self.path)
        if saved.get("config_sha256") != self.fingerprint:
            return {}
        self.units = saved.get("units", {})
        return saved

    def done(self, unit: str) -> bool:
        return unit in self.units

    def result(self, unit: str) -> dict[str, Any]:
        return self.units[unit]

    def start(self, unit: str) -> None:
        """Record that `unit` runs from now, in this process (rank 0; a second call keeps the first time)."""
        self.running.setdefault(unit, {"since": time.time(), "pid": os.getpid(), "host": socket.gethostname()})
        self._save()

    def complete(self, unit: str, result: dict[str, Any] | None = None) -> dict[str, Any]:
        self.units[unit] = result or {}
        self.running.pop(unit, None)
        self._save()
        return self.units[unit]

    def forget(self, unit: str) -> None:
        """Drop a completed unit so that it is redone (rank 0: its outputs went missing)."""
        del self.units[unit]
        self._save()

    def fail(self, unit: str, error: BaseException) -> None:
        """Record that `unit` raised in this attempt, so ranks waiting for it raise too."""
        started = self.running.pop(unit, {}).get("since")
        self._save(Failure.of(unit, error, rank=0, since=started, attempt=self.attempt).to_dict())

    def wait_for(self, unit: str) -> dict[str, Any]:
        """Block until rank 0 records `unit`, then return its result (ranks other than 0).

        Raises RankZeroFailed when rank 0 records a failure in this attempt (an attempt is known
        only to ranks Lightning launched from rank 0; other launchers, such as torchrun, stop
        every rank when one fails) or when this rank's launcher process exits.
        """
        def ready() -> bool:
            self.check_rank_zero(unit)
            return unit in self.units
        poll(ready)
        return self.units[unit]

    def check_rank_zero(self, waiting_for: str) -> None:
        """Raise RankZeroFailed if rank 0 recorded a failure in this attempt or this rank's
        launcher exited (called by every wait of a rank other than 0; reloads the state)."""
        failed = self._load().get("failed")
        if failed and self.attempt is not None and failed.get("attempt") == self.attempt:
            raise RankZeroFailed(Failure.from_dict(failed).message(waiting_for))
        if os.getppid() != self._launcher:
            raise RankZeroFailed(f"the launching process (pid {self._launcher}) exited while this rank "
                                 f"waited for {waiting_for}; see rank 0's output")

    def _save(self, failed: dict[str, Any] | None = None) -> None:
        if not self.writer:
            raise RuntimeError("only rank 0 writes state.json")
        state: dict[str, Any] = {"config_sha256": self.fingerprint, "units": self.units}
        if self.forced:
            state["forced"] = self.forced
        if self.running:
            state["running"] = self.running
        if failed is not None:
            state["failed"] = failed
        write_json(self.path, state)
