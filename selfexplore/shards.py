"""Resumable shard folders that every rank writes and rank 0 merges.

The sample and explore stages write shards that a rerun resumes. Resuming under other settings
(model, seed, input, ...) would mix two runs' outputs, and discarding the shards would lose
finished work, so both stages refuse another run's folder with a per-key diff unless forced.
With several processes (ranks of all nodes) each writes only the shards it owns, and rank 0
merges once every shard is there (`ShardFolder`); waiting is a file poll with per-rank failure
records, not a collective that a long sampling unit would time out.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfexplore.configdiff import config_diff, format_diff
from selfexplore.hashing import file_sha256
from selfexplore.io import DataError, read_json, write_json, write_jsonl


def load_manifest(path: Path, settings: dict[str, Any], manifest_format: int, force: bool,
                  stage: str) -> dict[str, Any]:
    """The manifest of an earlier `stage` run at `path` with the same settings ({} when none).

    A manifest with other settings (or format) raises ValueError naming each changed key, unless
    `force`, which deletes the manifest's folder with its shards.
    """
    if not path.is_file():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        manifest = {}
    old = manifest.get("config")
    if manifest.get("format") == manifest_format and old == settings:
        return manifest
    if not force:
        diff = format_diff(config_diff(old, settings)) if isinstance(old, dict) else ""
        raise ValueError(
            f"{path} belongs to a {stage} run with a different config ({diff or 'manifest format'}). "
            f"Resuming would mix the outputs of two configs. Use another output path, or force=True "
            f"(--force) to discard the existing shards.")
    shutil.rmtree(path.parent)
    return {}


log = logging.getLogger(__name__)

# ----------------------------------------------------------------- data-parallel shard folders
# Launchers name a process's rank in these (torchrun: RANK/WORLD_SIZE; srun: SLURM_*;
# Lightning's launcher: NODE_RANK/LOCAL_RANK/WORLD_SIZE, set only once its first fit started).
POLL_SECONDS = (0.02, 0.5)  # fast at first (most waits are short), then at most twice a second
STALE_SLACK_SECONDS = 5.0  # a failure record older than the session (minus clock skew) is a past run's


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes that share a data-parallel unit.

    Shards are the unit of work, never ranks: rank r takes shards r, r + W, ... (`owns`), so any
    world size writes the same shard files and a resume may use another one. `since` is when
    this session started: failure records written before it belong to an earlier attempt.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    since: float = field(default_factory=time.time)

    @classmethod
    def from_environment(cls, devices_per_node: int | None = None, num_nodes: int = 1) -> Workers:
        """This process's rank from its launcher's variables. Under Lightning's own launcher
        (LOCAL_RANK / NODE_RANK, set from its first fit on; it removes WORLD_SIZE after every
        fit) the world is `devices_per_node` x `num_nodes`."""
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        elif "LOCAL_RANK" in env and (devices_per_node or "WORLD_SIZE" in env):  # Lightning's launcher
            per_node = devices_per_node or int(env["WORLD_SIZE"]) // num_nodes
            world = per_node * num_nodes
            rank = int(env.get("NODE_RANK", "0")) * per_node + int(env["LOCAL_RANK"])
        else:
            rank, world = 0, 1
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
        if not 0 <= rank < world:
            raise RuntimeError(f"rank {rank} is outside world size {world} (launcher environment)")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


class ShardFolder:
    """The shard files of one stage run, written by every rank, merged by rank 0.

    Rank 0 guards the folder (`load_manifest`: refuse another config unless force) and writes
    the manifest; the other ranks wait for a manifest of the same config before they write.
    A shard is done when its records file and then its meta file (counts, the content hash, the
    writing rank) exist and the file still has that content; each is written atomically, so a
    kill leaves a shard done or absent, and a shard changed since (edited, truncated, records
    duplicated) is redone, never merged. A rank that
    fails records its error; rank 0, waiting for the other ranks' shards, raises with it.
    """

    def __init__(self, directory: Path, stage: str, settings: dict[str, Any], manifest_format: int,
                 workers: Workers, shard_name: Callable[[int], str],
                 abort: Callable[[], None] | None = None) -> None:
        self.directory, self.stage, self.settings = Path(directory), stage, settings
        self.format, self.workers, self.shard_name = manifest_format, workers, shard_name
        self.abort = abort  # raises when the waiting should stop (e.g. rank 0 recorded a failure)
        self._verified: dict[Path, tuple[int, int]] = {}  # shard -> (size, mtime) its hash was checked at

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def open(self, force: bool, extra: Mapping[str, Any] | None = None) -> None:
        """Rank 0: check or (re)create the folder for these settings; others: wait until it is."""
        if self.workers.is_main:
            load_manifest(self.manifest, self.settings, self.format, force, self.stage)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._failure(self.workers.rank).unlink(missing_ok=True)
            write_json(self.manifest, {"format": self.format, "config": self.settings, **(extra or {})})
            return
        self._failure(self.workers.rank).unlink(missing_ok=True)
        self._poll(self._manifest_ready, f"rank 0's {self.manifest}")

    def _manifest_ready(self) -> bool:
        if not self.manifest.is_file():
            return False
        try:
            manifest = read_json(self.manifest)
        except DataError:  # never half-written (atomic), but a foreign file may be anything
            return False
        return manifest.get("format") == self.format and manifest.get("config") == self.settings

    def path(self, index: int) -> Path:
        return self.directory / self.shard_name(index)

    def _meta(self, index: int) -> Path:
        return self.path(index).with_suffix(".meta.json")

    def _failure(self, rank: int) -> Path:
        return self.directory / f"failed.rank{rank}.json"

    def done(self, index: int) -> bool:
        """Whether shard `index` is complete: its meta exists and its file holds what the meta recorded."""
        meta, path = self._meta(index), self.path(index)
        if not (meta.is_file() and path.is_file()):
            return False
        stat = path.stat()
        if self._verified.get(path) == (stat.st_size, stat.st_mtime_ns):
            return True  # polled again while waiting: unchanged since its hash was checked
        recorded = read_json(meta).get("sha256")
        if recorded != file_sha256(path):
            log.warning("%s: its content is not what %s recorded (changed since it was written); redoing it",
                        path, meta.name)
            return False
        self._verified[path] = (stat.st_size, stat.st_mtime_ns)
        return True

    def todo(self, count: int) -> list[int]:
        """This rank's shards among `count` that are not done yet."""
        return [i for i in range(count) if self.workers.owns(i) and not self.done(i)]

    def write(self, index: int, records: list[dict[str, Any]], meta: Mapping[str, Any]) -> None:
        path = self.path(index)
        write_jsonl(path, records)
        write_json(self._meta(index), {**meta, "records": len(records), "sha256": file_sha256(path),
                                       "rank": self.workers.rank})

    def meta(self, index: int) -> dict[str, Any]:
        return read_json(self._meta(index))

    def fail(self, error: BaseException) -> None:
        """Record that this rank failed (rank 0 raises it while waiting for this rank's shards)."""
        write_json(self._failure(self.workers.rank), {
            "rank": self.workers.rank, "host": socket.gethostname(), "time": time.time(),
            "error": f"{type(error).__name__}: {error}"})

    def wait_all(self, count: int) -> None:
        """Rank 0: block until every shard is done; raise with the error a rank recorded."""
        self._poll(lambda: all(self.done(i) for i in range(count)), f"{count} shards in {self.directory}")

    def _poll(self, ready: Callable[[], bool], what: str) -> None:
        delay, max_delay = POLL_SECONDS
        while not ready():
            for path in sorted(self.directory.glob("failed.rank*.json")) if self.directory.is_dir() else []:
                record = read_json(path)
                if record.get("rank") != self.workers.rank and \
                        record.get("time", 0) >= self.workers.since - STALE_SLACK_SECONDS:
                    raise RuntimeError(f"{self.stage}: rank {record['rank']} ({record.get('host')}) failed while "
                                       f"this rank waited for {what}: {record['error']}")
            if self.abort is not None:
                self.abort()
            time.sleep(delay)
            delay = min(2 * delay, max_delay)
