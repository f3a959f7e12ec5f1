"""The explore stage: rejected rationales of pairs.jsonl -> explore.jsonl + gpairs.jsonl.

Resumable: rationales are cut into chunks of whole questions (about `chunk_size` rationales,
so prefixes shared within a question stay in one cache); each chunk's records are written
atomically as a shard under `explore_shards/` and then marked done in its manifest. A rerun
skips done chunks. Every sampler seed is derived from (seed, chunk, wave), so an interrupted
and resumed run writes exactly what an uninterrupted one does (given the same sampler model).
Shards made with other search settings or other input are discarded, with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.granular import build_granular_pairs, explore_stats, pit_agreement
from selfexplore.explore.pit import Rationale, find_first_pits
from selfexplore.io import DataError, iter_jsonl, read_json, read_jsonl, require_str, write_json, write_jsonl

if TYPE_CHECKING:  # typing only: importing them would pull torch and the graders into every use
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Problem, Task

log = logging.getLogger(__name__)

SHARD_DIR = "explore_shards"
MANIFEST = "manifest.json"


def load_rejected(pairs_path: str | os.PathLike, problems_by_id: Mapping[str, Problem]) -> list[Rationale]:
    """The rejected rationales of a pairs file, once per rejected sample id (first pair wins)."""
    rationales: list[Rationale] = []
    seen: set[str] = set()
    for line, rec in iter_jsonl(pairs_path):
        meta = rec.get("meta")
        if not isinstance(meta, dict):
            raise DataError("expected an object", pairs_path, line, "meta")
        sample_id = require_str(meta, "rejected_id", pairs_path, line)
        qid = require_str(meta, "question_id", pairs_path, line)
        prompt = require_str(rec, "prompt", pairs_path, line)
        rejected = require_str(rec, "rejected", pairs_path, line, allow_empty=True)
        chosen = require_str(rec, "chosen", pairs_path, line, allow_empty=True)
        ends = rec.get("rejected_ends", True)
        if not isinstance(ends, bool):
            raise DataError(f"expected true or false, got {ends!r}", pairs_path, line, "rejected_ends")
        if qid not in problems_by_id:
            raise DataError(f"unknown question id {qid!r}", pairs_path, line, "meta.question_id")
        if sample_id in seen:
            continue
        seen.add(sample_id)
        rationales.append(Rationale(sample_id, qid, prompt, problems_by_id[qid].answer, rejected, chosen, ends))
    return rationales


def chunk_by_question(rationales: list[Rationale], chunk_size: int) -> list[list[Rationale]]:
    """Consecutive chunks of whole questions, each closed once it holds >= chunk_size rationales."""
    by_question: dict[str, list[Rationale]] = {}
    for r in rationales:
        by_question.setdefault(r.question_id, []).append(r)
    chunks: list[list[Rationale]] = []
    current: list[Rationale] = []
    for group in by_question.values():
        current.extend(group)
        if len(current) >= chunk_size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _fingerprint(config: ExploreConfig, chunks: list[list[Rationale]]) -> str:
    blob = json.dumps({"config": config.search_fingerprint(),
                       "chunks": [[asdict(r) for r in chunk] for chunk in chunks]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _done_chunks(shard_dir: Path, fingerprint: str) -> set[int]:
    """Chunks finished by an earlier run with the same settings and input; stale shards go."""
    manifest_path = shard_dir / MANIFEST
    if not manifest_path.is_file():
        return set()
    manifest = read_json(manifest_path)
    if manifest.get("fingerprint") == fingerprint:
        return {i for i in manifest.get("done", []) if (shard_dir / _shard_name(i)).is_file()}
    log.warning("%s: shards from other settings or input; exploring from scratch", shard_dir)
    shutil.rmtree(shard_dir)
    return set()


def _shard_name(index: int) -> str:
    return f"chunk_{index:05d}.jsonl"


def run_explore_stage(sampler: Sampler, task: Task, pairs_path: str | os.PathLike,
                      problems_by_id: Mapping[str, Problem], out_dir: str | os.PathLike,
                      config: ExploreConfig | None = None) -> dict[str, Any]:
    """Explore every rejected rationale of `pairs_path`; write explore.jsonl, gpairs.jsonl and
    explore_stats.json into `out_dir`; return the stats."""
    config = config or ExploreConfig()
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    chunks = chunk_by_question(load_rejected(pairs_path, problems_by_id), config.chunk_size)
    fingerprint = _fingerprint(config, chunks)
    done = _done_chunks(shard_dir, fingerprint)
    if done:
        log.info("explore: resuming, %d of %d chunks already done", len(done), len(chunks))
    for i, chunk in enumerate(chunks):
        if i in done:
            continue
        records = find_first_pits(chunk, sampler, task, config, chunk_index=i)
        write_jsonl(shard_dir / _shard_name(i), records)
        done.add(i)
        write_json(shard_dir / MANIFEST, {"fingerprint": fingerprint, "num_chunks": len(chunks),
                                          "done": sorted(done)})
        log.info("explore: chunk %d/%d done (%d rationales)", i + 1, len(chunks), len(chunk))
    records = [rec for i in range(len(chunks)) for rec in read_jsonl(shard_dir / _shard_name(i))]
    pairs = build_granular_pairs(records, config.rejected_mode, round=config.round)
    stats = explore_stats(records, pairs)
    stats["mode"] = config.mode
    stats.update(pit_agreement(records, lambda r: task.first_wrong_step(problems_by_id[r["question_id"]], r["steps"])))
    write_jsonl(out_dir / "explore.jsonl", records)
    write_jsonl(out_dir / "gpairs.jsonl", pairs)
    write_json(out_dir / "explore_stats.json", stats)
    return stats
