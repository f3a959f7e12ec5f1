"""Resumable shard folders that every rank writes and rank 0 merges.

The sample and explore stages write shards that a rerun resumes. Resuming under other settings
(model, seed, input, ...) would mix two runs' outputs, and discarding the shards would lose
finished work, so both stages refuse another run's folder with a per-key diff unless forced.
With several processes (ranks of all nodes) each writes only the shards it owns, and rank 0
merges once every shard is there; waiting is a file poll with per-rank failure records, not a
collective that a long sampling unit would time out. `ShardFolder.run` is that skeleton, so a
new sharded stage supplies only its shards and its merge, with the one `StageContext`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Generator, Mapping
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from selfexplore.configdiff import config_diff, format_diff
from selfexplore.hashing import file_sha256
from selfexplore.io import DataError, read_json, write_json, write_jsonl
from selfexplore.ranks import Failure, Workers, poll

if TYPE_CHECKING:  # typing only: the tasks pull in the graders
    from selfexplore.tasks.base import Problem


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

STALE_SLACK_SECONDS = 5.0  # a failure record older than the session (minus clock skew) is a past run's
# One shard a stage made: (index, records, meta fields beside the counts and the hash).
Shard = tuple[int, list[dict[str, Any]], Mapping[str, Any]]
T = TypeVar("T")


@dataclass(frozen=True)
class StageContext:
    """What every sharded stage runs with beside its own inputs and config.

    `model` names the policy in the resume guard; `force` discards another config's shards;
    `prompt` turns a problem into model input (None: the task's raw prompt); `workers` are the
    ranks that share the stage (default: this process alone); `abort` is called while a rank
    waits and raises to stop it (e.g. when rank 0 recorded a failure).
    """

    model: str = ""
    force: bool = False
    prompt: Callable[[Problem], str] | None = None
    workers: Workers = field(default_factory=Workers)
    abort: Callable[[], None] | None = None


class ShardFolder:
    """The shard files of one stage run, written by every rank, merged by rank 0 (`run`).

    Rank 0 guards the folder (`load_manifest`: refuse another config unless force) and writes
    the manifest; the other ranks wait for a manifest of the same config before they write.
    A shard is done when its records file and then its meta file (counts, the content hash, the
    writing rank) exist and the file still has that content; each is written atomically, so a
    kill leaves a shard done or absent, and a shard changed since (edited, truncated, records
    duplicated) is redone, never merged. A rank that fails records its `Failure`; rank 0,
    waiting for the other ranks' shards, raises with it.
    """

    def __init__(self, directory: Path, stage: str, settings: dict[str, Any], manifest_format: int,
                 shard_name: Callable[[int], str], context: StageContext) -> None:
        self.directory, self.stage, self.settings = Path(directory), stage, settings
        self.format, self.shard_name, self.context = manifest_format, shard_name, context
        self.workers = context.workers
        self.resumed = 0  # shards already done when `run` opened the folder
        self._verified: dict[Path, tuple[int, int]] = {}  # shard -> (size, mtime) its hash was checked at

    def run(self, count: int, produce: Callable[[list[int]], Generator[Shard, None, None]], merge: Callable[[], T],
            extra: Mapping[str, Any] | None = None) -> T | None:
        """The skeleton of every sharded stage: open the folder, write the shards `produce` makes of
        this rank's missing ones (a failure is recorded for the waiting ranks, then raised) and, on
        rank 0, wait for all `count` shards and return `merge()`. Other ranks return None: rank 0
        merges alone, and the pipeline's other ranks take its recorded result."""
        self._open(extra)
        mine = self._todo(count)
        self.resumed = sum(self._done(i) for i in range(count))
        if self.resumed:
            log.info("%s: resuming, %d of %d shards done, %d left to this rank", self.stage, self.resumed, count,
                     len(mine))
        try:
            with closing(produce(mine)) as shards:
                for index, records, meta in shards:
                    self._write(index, records, meta)
        except BaseException as error:
            self._fail(error)
            raise
        if not self.workers.is_main:
            return None
        self._wait_all(count)
        return merge()

    @property
    def manifest(self) -> Path:
        return self.directory / "manifest.json"

    def _open(self, extra: Mapping[str, Any] | None) -> None:
        """Rank 0: check or (re)create the folder for these settings; others: wait until it is."""
        if self.workers.is_main:
            load_manifest(self.manifest, self.settings, self.format, self.context.force, self.stage)
            self.directory.mkdir(parents=True, exist_ok=True)
            self._failure(self.workers.rank).unlink(missing_ok=True)
            write_json(self.manifest, {"format": self.format, "config": self.settings, **(extra or {})})
            return
        self._failure(self.workers.rank).unlink(missing_ok=True)
        self._wait(self._manifest_ready, f"rank 0's {self.manifest}")

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

    def _done(self, index: int) -> bool:
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

    def _todo(self, count: int) -> list[int]:
        """This rank's shards among `count` that are not done yet."""
        return [i for i in range(count) if self.workers.owns(i) and not self._done(i)]

    def _write(self, index: int, records: list[dict[str, Any]], meta: Mapping[str, Any]) -> None:
        path = self.path(index)
        write_jsonl(path, records)
        write_json(self._meta(index), {**meta, "records": len(records), "sha256": file_sha256(path),
                                       "rank": self.workers.rank})

    def meta(self, index: int) -> dict[str, Any]:
        return read_json(self._meta(index))

    def _fail(self, error: BaseException) -> None:
        """Record that this rank failed (rank 0 raises it while waiting for this rank's shards)."""
        failure = Failure.of(self.stage, error, self.workers.rank, since=self.workers.since)
        write_json(self._failure(self.workers.rank), failure.to_dict())

    def _wait_all(self, count: int) -> None:
        """Rank 0: block until every shard is done; raise with the error a rank recorded."""
        self._wait(lambda: all(self._done(i) for i in range(count)), f"{count} shards in {self.directory}")

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        """Poll `ready`; raise when another rank recorded a failure in this session or `abort` raises."""
        def check() -> bool:
            if ready():
                return True
            for path in sorted(self.directory.glob("failed.rank*.json")) if self.directory.is_dir() else []:
                failure = Failure.from_dict(read_json(path))
                if failure.rank != self.workers.rank and failure.at >= self.workers.since - STALE_SLACK_SECONDS:
                    raise RuntimeError(failure.message(what))
            if self.context.abort is not None:
                self.context.abort()
            return False
        poll(check)
