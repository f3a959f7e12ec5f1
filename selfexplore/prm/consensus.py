"""Label quality: a consensus check of every pit, and the labels' accuracy where the truth is known.

Hard labels from k draws have false pits: a weak completer can fail k times from a good step.
Re-exploring the pit prefix with fresh draws (a judge-free consensus) tells them apart: a pit is
confirmed when none of the fresh draws reaches the gold answer either. Each explored row gets
`consensus` = {"k", "successes", "confirmed"}; `ConsensusConfig.keep="confirmed"` keeps only
confirmed pits. Every draw has its own seed (`derive_seed` of the config's seed, the row's sample
and pit, the draw number), so the check is reproducible and independent of batching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from selfexplore.explore.granular import pit_agreement
from selfexplore.explore.pit import steps_prefix
from selfexplore.hashing import derive_seed
from selfexplore.prm.config import ConsensusConfig
from selfexplore.streaming import open_stream

if TYPE_CHECKING:
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Task


def pit_seeds(config: ConsensusConfig, row: Mapping[str, Any]) -> list[int]:
    """The fresh draws' seeds of one row's pit (one per draw)."""
    return [derive_seed(config.seed, "consensus", row["sample_id"], row["pit"], j, bits=31) for j in range(config.k)]


def check_pits(rows: Sequence[dict[str, Any]], sampler: Sampler, task: Task, gold: Mapping[str, str],
               config: ConsensusConfig | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows with `consensus` on every explored pit row (others get None), filtered by `config.keep`,
    and the agreement stats. `gold` maps question id to gold answer."""
    config = config or ConsensusConfig()
    pits = [r for r in rows if r["source"] == "explored" and r["pit"] is not None]
    stream = open_stream(sampler, config.draws())
    found: dict[int, dict[str, Any]] = {}
    try:
        for i, r in enumerate(pits):
            stream.submit(i, r["prompt"] + steps_prefix(r["completions"], r["pit"]), pit_seeds(config, r))
        while stream.pending_rows:
            for done in stream.collect():
                r = pits[done.key]
                text = steps_prefix(r["completions"], r["pit"])
                successes = sum(task.is_correct(text + c, gold[r["question_id"]]) for c in done.completions or [])
                found[done.key] = {"k": config.k, "successes": successes,
                                   "confirmed": done.completions is not None and successes == 0,
                                   **({"failure": done.failure} if done.completions is None else {})}
    finally:
        stream.close()
    checked = {id(r): found[i] for i, r in enumerate(pits)}
    out = [{**r, "consensus": checked.get(id(r))} for r in rows]
    if config.keep == "confirmed":
        out = [r for r in out if r["consensus"] is None or r["consensus"]["confirmed"]]
    confirmed = sum(c["confirmed"] for c in checked.values())
    return out, {"pits_checked": len(pits), "pits_confirmed": confirmed,
                 "pit_agreement": confirmed / len(pits) if pits else None,
                 "consensus_draws": config.k * len(pits), "rows_after_consensus": len(out)}


def label_quality(rows: Sequence[Mapping[str, Any]], first_wrong: Callable[[Mapping[str, Any]], int | None]
                  ) -> dict[str, Any]:
    """How well explored labels match the true first error, where `first_wrong(row)` knows it (arith's
    canonical rationales; None elsewhere): where pits fall (`pit_at_first_error`, ...) and
    `step_label_accuracy` (a step before the first error should be True, the first error False;
    later steps are undefined and not counted). {} when no row can be checked."""
    explored = [r for r in rows if r["source"] == "explored" and r["pit"] is not None]
    truth = {id(r): first_wrong(r) for r in explored}
    stats = pit_agreement([{"status": "pit", "pit": r["pit"], "row": r} for r in explored],
                          lambda rec: truth[id(rec["row"])])
    if not stats:
        return {}
    right = total = 0
    for r in explored:
        w = truth[id(r)]
        if w is None:
            continue
        for t, label in enumerate(r["labels"][:w], start=1):
            right += label == (t < w)
            total += 1
    return {**stats, "step_label_accuracy": right / total if total else None}
