"""`prm.jsonl` from an explore unit's output: the file checks and I/O around `build_prm_rows`.

What the `prm-data` command and the pipeline's explore unit call (`write_prm_data`). The explore
records are checked against the task's problems (question id, gold answer, prompt) and against
the samples file the correct rationales come from (each explored rationale must be that file's
sample, step for step), so an explore file of another task, data set or round is refused with
both named, never silently labelled with another problem's gold answer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfexplore.explore.builders import build_rft_set, read_samples
from selfexplore.explore.stage import SHARD_DIR
from selfexplore.io import DataError, iter_jsonl, read_json, require_str, write_json, write_jsonl
from selfexplore.prm.config import ConsensusConfig, PRMDataConfig
from selfexplore.prm.consensus import check_pits, label_quality
from selfexplore.prm.rows import build_prm_rows
from selfexplore.validation import raise_problems

if TYPE_CHECKING:
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Problem, Task

_ROUND = re.compile(r"round_(\d+)")
_LIST_FIELDS = ("steps", "outcomes")


def path_round(path: str | os.PathLike) -> int | None:
    """The round a run-directory path belongs to (its last `round_N` folder), None outside one."""
    found = [int(m.group(1)) for part in Path(path).parts for m in [_ROUND.fullmatch(part)] if m]
    return found[-1] if found else None


def resolve_round(explore_path: Path, samples_path: Path, round_index: int | None) -> int:
    """The rows' round: given, else the explore file's run-directory round, else 1. Refuses files of
    two rounds, and a given round that the explore file's folder contradicts (naming both)."""
    explore_round, samples_round = path_round(explore_path), path_round(samples_path)
    if explore_round is not None and samples_round is not None and explore_round != samples_round:
        raise DataError(f"the explore file is round {explore_round}'s but the samples file {samples_path} is "
                        f"round {samples_round}'s: give the samples the exploration was made from", explore_path)
    if round_index is not None and explore_round is not None and round_index != explore_round:
        raise DataError(f"asked for round {round_index} but the explore file is round {explore_round}'s",
                        explore_path)
    return round_index if round_index is not None else explore_round or 1


def resolve_k(explore_path: Path, k: int | None, records: list[dict[str, Any]]) -> int:
    """The exploration's k: given, else its shard manifest's, else the pit steps' draw count."""
    manifest = explore_path.parent / SHARD_DIR / "manifest.json"
    recorded = read_json(manifest).get("config", {}).get("k") if manifest.is_file() else None
    if k is not None and recorded is not None and k != recorded:
        raise DataError(f"k={k} asked for, but the exploration drew k={recorded} ({manifest})", explore_path)
    if k is not None or recorded is not None:
        return int(k if k is not None else recorded)
    draws = {len(o["correct"]) for r in records if r["status"] == "pit" for o in r["outcomes"] if o["step"] == r["pit"]}
    if len(draws) > 1:
        raise DataError(f"pit steps have different draw counts {sorted(draws)}: give k", explore_path)
    return draws.pop() if draws else 1


def check_explore_record(rec: dict[str, Any], problems_by_id: Mapping[str, Problem], task: Task,
                         path: Path, line: int) -> None:
    """Fields of an explore record, and that it is about one of `task`'s problems (file, line, field)."""
    for key in ("sample_id", "question_id", "prompt", "gold", "status"):
        require_str(rec, key, path, line)
    for key in _LIST_FIELDS:
        if not isinstance(rec.get(key), list):
            raise DataError(f"expected a list, got {type(rec.get(key)).__name__}", path, line, key)
    for o in rec["outcomes"]:
        if not isinstance(o, dict) or not isinstance(o.get("step"), int) or not isinstance(o.get("correct"), list):
            raise DataError("expected objects with an integer 'step' and a list 'correct'", path, line, "outcomes")
    pit = rec.get("pit")
    if rec["status"] == "pit" and not (isinstance(pit, int) and 1 <= pit <= len(rec["steps"])):
        raise DataError(f"expected a step number, got {pit!r}", path, line, "pit")
    qid = rec["question_id"]
    problem = problems_by_id.get(qid)
    if problem is None:
        example = next(iter(problems_by_id), "none")
        raise DataError(f"question {qid!r} is not a problem of task {task.name!r} as loaded ({len(problems_by_id)} "
                        f"problems, e.g. {example!r}): the explore file was made for another task or data",
                        path, line, "question_id")
    if rec["gold"] != problem.answer or task.prompt(problem).strip() not in rec["prompt"]:
        bad = "gold" if rec["gold"] != problem.answer else "prompt"
        raise DataError(f"not problem {qid!r} of task {task.name!r} as loaded (gold {problem.answer!r}): the explore "
                        "file was made for another task or data", path, line, bad)


def read_explore(path: Path, problems_by_id: Mapping[str, Problem], task: Task) -> list[dict[str, Any]]:
    """Every record of an explore file, checked; an empty file is an error."""
    records = []
    for line, rec in iter_jsonl(path):
        check_explore_record(rec, problems_by_id, task, path, line)
        records.append(rec)
    if not records:
        raise DataError("no explore records: the file is empty", path)
    return records


def check_same_samples(records: list[dict[str, Any]], samples: list[dict[str, Any]], task: Task,
                       explore_path: Path, samples_path: Path) -> None:
    """Each explored rationale must be a sample of `samples`, step for step (same round and run); steps
    compare without their surrounding whitespace, which the pair builders strip from the text explored."""
    def bare(steps: list[str]) -> list[str]:
        return [step.strip() for step in steps if step.strip()]

    by_id = {s["id"]: s for s in samples}
    for rec in records:
        sample = by_id.get(rec["sample_id"])
        if sample is None or bare(task.split_steps(sample["completion"])) != bare(rec["steps"]) or \
                sample["prompt"] != rec["prompt"]:
            what = "is not in" if sample is None else "differs from its sample in"
            raise DataError(f"explored rationale {rec['sample_id']!r} {what} {samples_path}: the explore file and "
                            "the samples file come from different rounds or runs", explore_path, None, "sample_id")


def write_prm_data(explore_path: str | os.PathLike, samples_path: str | os.PathLike, out_path: str | os.PathLike,
                   task: Task, problems_by_id: Mapping[str, Problem], *, k: int | None = None,
                   round_index: int | None = None, config: PRMDataConfig | None = None,
                   sampler: Sampler | None = None, consensus: ConsensusConfig | None = None) -> dict[str, Any]:
    """Build `out_path` (prm.jsonl) and `prm_stats.json` beside it from an explore file and the samples
    it explored (`explorer_samples.jsonl` of the round); return the stats.

    `k` and `round_index` default to what the files say (the shard manifest; the `round_N` folder).
    With `consensus`, `sampler` (the explorer) re-explores every pit (`check_pits`). Where the task
    knows each rationale's first wrong step (arith), the stats hold the labels' accuracy against it
    (`label_quality`; `label_quality_confirmed` for the confirmed pits). Nothing is written when a
    check fails.
    """
    config = config or PRMDataConfig()
    raise_problems(config.problems() + (consensus.problems() if consensus is not None else []), "prm data config")
    explore_path, samples_path, out_path = Path(explore_path), Path(samples_path), Path(out_path)
    round_index = resolve_round(explore_path, samples_path, round_index)
    records = read_explore(explore_path, problems_by_id, task)
    samples = read_samples(samples_path)
    check_same_samples(records, samples, task, explore_path, samples_path)
    k = resolve_k(explore_path, k, records)
    kept = {r["meta"]["sample_id"] for r in build_rft_set(samples, max(config.correct_per_question, 1))} \
        if config.correct_per_question else set()
    rows, stats = build_prm_rows(records, [s for s in samples if s["id"] in kept], task, k, round_index, config)
    if consensus is not None:
        if sampler is None:
            raise ValueError("the consensus check needs a sampler (the explorer) to draw from the pits")
        rows, checked = check_pits(rows, sampler, task, {q: p.answer for q, p in problems_by_id.items()}, consensus)
        stats.update(checked)
    full_steps = {r["sample_id"]: r["steps"] for r in records}

    def first_wrong(r: Mapping[str, Any]) -> int | None:
        return task.first_wrong_step(problems_by_id[r["question_id"]], full_steps[r["sample_id"]])

    quality = label_quality(rows, first_wrong)
    if quality:
        stats["label_quality"] = quality
    if quality and consensus is not None:
        stats["label_quality_confirmed"] = label_quality(
            [r for r in rows if r.get("consensus") and r["consensus"]["confirmed"]], first_wrong)
    stats.update({"round": round_index, "k": k, "explore": str(explore_path), "samples": str(samples_path)})
    write_jsonl(out_path, rows)
    write_json(out_path.with_name("prm_stats.json"), stats)
    return stats
