"""Granular (step-level) pairs D_g-pair from explore records, and exploration statistics.

A pair's prompt is the question plus the steps before the pit (the prefix the completions were
sampled from); rejected is the pit step, chosen the shortest correct completion of that prefix,
so both sides are well-formed rationales. `"rejected_ends"` says whether the rejected side
ends the response; pairs are deduplicated per question, as in the paper.

Design notes: docs/design.md#granular-pairs
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from selfexplore.explore.config import REJECTED_MODES, RejectedMode
from selfexplore.explore.pit import STEP_SEP, steps_prefix
from selfexplore.io import DataError

_REQUIRED = ("sample_id", "question_id", "prompt", "steps", "outcomes", "status", "pair_chosen")


def _check_record(rec: dict[str, Any], i: int) -> None:
    for key in _REQUIRED:
        if key not in rec:
            raise DataError(f"explore record #{i}: missing field", field=key)
    pit = rec.get("pit")
    if rec["status"] == "pit" and not (isinstance(pit, int) and 1 <= pit <= len(rec["steps"])):
        raise DataError(f"explore record #{i}: pit must be a step number", field="pit")


def _shortest_correct(outcome: dict[str, Any]) -> str:
    """The shortest non-empty, correct, finished completion of one step's outcomes ('' when none)."""
    finished = outcome.get("finished") or [True] * len(outcome["completions"])
    texts = [c.strip() for c, ok, done in zip(outcome["completions"], outcome["correct"], finished) if ok and done]
    texts = [t for t in texts if t]
    return min(texts, key=len) if texts else ""


def granular_pair(rec: dict[str, Any], rejected_mode: RejectedMode = "pit_step",
                  round_index: int = 1) -> dict[str, Any] | None:
    """The pair one explore record yields before dedup (None without a pit or a usable chosen)."""
    if rejected_mode not in REJECTED_MODES:
        raise ValueError(f"rejected_mode must be one of {REJECTED_MODES}, got {rejected_mode!r}")
    if rec["status"] != "pit":
        return None
    t, steps = rec["pit"], rec["steps"]
    if t == 1:
        prompt, chosen = rec["prompt"], rec["pair_chosen"].strip()
    else:
        by_step = {o["step"]: o for o in rec["outcomes"]}
        if t - 1 not in by_step:
            return None
        prompt, chosen = rec["prompt"] + steps_prefix(steps, t - 1), _shortest_correct(by_step[t - 1])
    rejected = (steps[t - 1] if rejected_mode == "pit_step" else STEP_SEP.join(steps[t - 1:])).strip()
    if not chosen or not rejected or chosen == rejected:
        return None
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected,
            "rejected_ends": (rejected_mode == "pit_to_end" or t == len(steps)) and rec.get("rejected_ends", True),
            "meta": {"question_id": rec["question_id"], "source": "explore", "pit_step": t,
                     "num_steps": len(steps), "source_sample_id": rec["sample_id"], "round": round_index}}


def build_granular_pairs(explore_records: Sequence[dict[str, Any]],
                         rejected_mode: RejectedMode = "pit_step",
                         round_index: int = 1) -> list[dict[str, Any]]:
    """D_g-pair from explore records (module doc: text rules, answer-line rule, dedup)."""
    seen_chosen: dict[str, set[str]] = {}
    seen_rejected: dict[str, set[str]] = {}
    pairs: list[dict[str, Any]] = []
    for i, rec in enumerate(explore_records):
        _check_record(rec, i)
        pair = granular_pair(rec, rejected_mode, round_index)
        if pair is None:
            continue
        qid = rec["question_id"]
        chosen_seq, rejected_seq = pair["prompt"] + pair["chosen"], pair["prompt"] + pair["rejected"]
        chosen_seen, rejected_seen = seen_chosen.setdefault(qid, set()), seen_rejected.setdefault(qid, set())
        if chosen_seq in chosen_seen or rejected_seq in rejected_seen:
            continue
        chosen_seen.add(chosen_seq)
        rejected_seen.add(rejected_seq)
        pairs.append(pair)
    return pairs


def pit_agreement(records: Sequence[dict[str, Any]],
                  first_wrong_step: Callable[[dict[str, Any]], int | None]) -> dict[str, Any]:
    """Where the first pits fall relative to the first wrong step, for records where it is known.

    `first_wrong_step(record)` gives that step (e.g. from a canonical gold rationale) or None.
    A pit before it marks a right step (no completion from just after it succeeded: the policy
    could not get past a later mistake); a pit after it, a mistake the policy recovered from.
    Returns {} when no pit can be checked.
    """
    where: Counter[str] = Counter()
    for r in records:
        if r["status"] != "pit":
            continue
        wrong = first_wrong_step(r)
        if wrong is not None:
            where["at" if r["pit"] == wrong else "before" if r["pit"] < wrong else "after"] += 1
    checked = sum(where.values())
    if not checked:
        return {}
    return {"pits_checked": checked, "pit_at_first_error": where["at"] / checked,
            "pit_before_first_error": where["before"] / checked, "pit_after_first_error": where["after"] / checked}


def explore_stats(records: Sequence[dict[str, Any]], pairs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the exploration found and what it cost.

    pit_histogram: pits per step number; no_pit_fraction: among explored (not skipped)
    rationales; pairs_per_question: mean over questions that had a rationale explored;
    tokens_per_pit / tokens_per_pair: generated tokens per pit found / per granular pair kept.
    """
    status = Counter(r["status"] for r in records)
    pits = [r["pit"] for r in records if r["status"] == "pit"]
    explored = status["pit"] + status["no_pit"]
    questions = {r["question_id"] for r in records if r["status"] in ("pit", "no_pit")}
    tokens = sum(int(r.get("tokens_generated", 0)) for r in records)
    hist = Counter(pits)
    return {
        "num_rationales": len(records),
        "num_explored": explored,
        "num_pits": len(pits),
        "num_no_pit": status["no_pit"],
        "no_pit_fraction": status["no_pit"] / explored if explored else 0.0,
        "skipped": {k: v for k, v in sorted(status.items()) if k.startswith("skipped:")},
        "pit_histogram": {str(t): hist[t] for t in sorted(hist)},
        "mean_pit_step": sum(pits) / len(pits) if pits else None,
        "num_pairs": len(pairs),
        "pairs_dropped": len(pits) - len(pairs),
        "pairs_per_question": len(pairs) / len(questions) if questions else 0.0,
        "tokens_generated": tokens,
        "tokens_per_pit": tokens / len(pits) if pits else None,
        "tokens_per_pair": tokens / len(pairs) if pairs else None,
    }
