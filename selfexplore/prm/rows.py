"""Process-reward rows (TRL's stepwise supervision) from explore records and graded samples.

Exploration already decides, for each explored step prefix of a wrong rationale, whether any of
k completions reached the gold answer; the first prefix from which none did is the pit
(Math-Shepherd's hard estimate). A row keeps TRL's columns exactly and puts the rest beside them:

    prompt       str        the prompt the rationale was sampled from
    completions  list[str]  its steps up to the pit, as written (nothing after the pit: undefined)
    labels       list[bool] [True] * (pit - 1) + [False]; all True for a correct rationale
    mc           list[float] | None  per step, the fraction of its draws that reached gold
    draws        list[int] | None    per step, how many draws were made (adaptive search stops a
                                     step at its first success, so a good step may have < k)
    k, pit       the exploration's k and the pit's step number (1-based, as in explore.jsonl)
    question_id, sample_id, round
    source       "explored" (labels from exploration) or "outcome" (from the final answer alone:
                 a right answer can hide a wrong step, so a verifier's user can weigh them apart)

Pure functions: the file-level checks and I/O are in `selfexplore.prm.data`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from selfexplore.explore.pit import STEP_SEP
from selfexplore.hashing import derive_seed
from selfexplore.io import DataError
from selfexplore.prm.config import PRMDataConfig

if TYPE_CHECKING:
    from selfexplore.tasks.base import Task

TRL_COLUMNS = ("prompt", "completions", "labels")
SINGLE_STEP = "skipped:single_step"


def step_mc(outcome: Mapping[str, Any]) -> tuple[float, int]:
    """(fraction of a step's draws that reached gold, number of draws)."""
    correct = outcome["correct"]
    return (sum(map(bool, correct)) / len(correct) if correct else 0.0), len(correct)


def row(prompt: str, steps: Sequence[str], labels: Sequence[bool], *, source: str, question_id: str,
        sample_id: str, round_index: int, k: int | None = None, pit: int | None = None,
        mc: Sequence[float] | None = None, draws: Sequence[int] | None = None) -> dict[str, Any]:
    """One prm.jsonl row (TRL columns first); asserts one label per step."""
    if len(steps) != len(labels) or not steps:
        raise ValueError(f"a row needs one label per step, got {len(steps)} steps and {len(labels)} labels")
    return {"prompt": prompt, "completions": list(steps), "labels": [bool(x) for x in labels],
            "mc": None if mc is None else list(mc), "draws": None if draws is None else list(draws),
            "k": k, "pit": pit, "question_id": question_id, "sample_id": sample_id, "round": round_index,
            "source": source}


def explored_row(rec: Mapping[str, Any], round_index: int, k: int, where: str = "explore record"
                 ) -> tuple[dict[str, Any] | None, str]:
    """The row of one explore record and what kind it is ("pit", "no_pit", "single_step", or the
    record's skip status, which gives no row).

    A pit record's steps before the pit must each have a success and its pit step k draws, none
    successful (else the record was not made by this search: DataError). "no_pit" (every explored
    step recovered although the answer is wrong) returns its all-true row; the caller decides
    whether to keep it. A one-step wrong rationale (exploration skips it) is its own first error:
    labels [False], source "outcome".
    """
    status, steps = rec["status"], rec["steps"]
    common = {"question_id": rec["question_id"], "sample_id": rec["sample_id"], "round_index": round_index}
    if status == SINGLE_STEP and len(steps) == 1:
        return row(rec["prompt"], steps, [False], source="outcome", pit=1, **common), "single_step"
    if status not in ("pit", "no_pit"):
        return None, status
    by_step = {o["step"]: o for o in rec["outcomes"]}
    last = rec["pit"] if status == "pit" else len(rec["outcomes"])
    if any(t not in by_step for t in range(1, last + 1)):
        raise DataError(f"{where}: outcomes do not cover steps 1..{last}", field="outcomes")
    mc, draws = zip(*(step_mc(by_step[t]) for t in range(1, last + 1)))
    if any(m == 0 for m in mc[:-1]) or (status == "no_pit" and mc[-1] == 0):
        raise DataError(f"{where}: a step before the last explored one has no successful draw "
                        "(not a first-pit search's record)", field="outcomes")
    if status == "pit" and (mc[-1] != 0 or draws[-1] != k):
        raise DataError(f"{where}: the pit step has {draws[-1]} draws with {mc[-1]:.2f} successful; a pit needs "
                        f"all k={k} draws failed (is k the exploration's?)", field="outcomes")
    labels = [True] * last if status == "no_pit" else [True] * (last - 1) + [False]
    return row(rec["prompt"], steps[:last], labels, source="explored", k=k,
               pit=rec["pit"] if status == "pit" else None, mc=mc, draws=draws, **common), status


def outcome_row(sample: Mapping[str, Any], steps: Sequence[str], round_index: int) -> dict[str, Any]:
    """A graded sample's steps, every label its final-answer correctness (source "outcome")."""
    return row(sample["prompt"], steps, [bool(sample["correct"])] * len(steps), source="outcome",
               question_id=sample["question_id"], sample_id=sample["id"], round_index=round_index)


def build_prm_rows(explore_records: Iterable[Mapping[str, Any]], correct_samples: Iterable[Mapping[str, Any]],
                   task: Task, k: int, round_index: int = 1, config: PRMDataConfig | None = None
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """prm.jsonl rows and their stats: explored rows first (input order), then outcome rows.

    `correct_samples` are graded samples (samples.jsonl schema) already picked as correct;
    each is re-graded with `task` (against its `gold`), as is every explored rationale, and a
    label that contradicts the task's own verdict is counted under `disagree` (a pit on a
    rationale the task grades correct; a correct-labelled sample it grades wrong; a wrong
    rationale with no pit). Disagreeing rows follow `config.disagreeing`.
    """
    config = config or PRMDataConfig()
    kinds: Counter[str] = Counter()
    disagree: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for i, rec in enumerate(explore_records):
        out, kind = explored_row(rec, round_index, k, f"explore record #{i}")
        kinds[kind] += 1
        if out is None:
            continue
        right = task.is_correct(STEP_SEP.join(rec["steps"]), rec["gold"])
        reason = "pit_on_correct" if right and kind in ("pit", "single_step") else \
            "no_pit_on_wrong" if not right and kind == "no_pit" else None
        if reason is not None:
            disagree[reason] += 1
        if reason is None or config.disagreeing == "keep":
            rows.append(out)
    for s in correct_samples:
        steps = task.split_steps(s["completion"])
        if not steps:
            kinds["outcome_no_steps"] += 1
            continue
        kinds["outcome"] += 1
        out = outcome_row(s, steps, round_index)
        if not task.is_correct(s["completion"], s["gold"]):
            disagree["correct_sample_graded_wrong"] += 1
            if config.disagreeing == "drop":
                continue
        rows.append(out)
    return rows, prm_stats(rows, kinds, disagree)


def prm_stats(rows: Sequence[Mapping[str, Any]], kinds: Mapping[str, int], disagree: Mapping[str, int]
              ) -> dict[str, Any]:
    """Counts of what was read and written; labels are mostly positive, so their balance is shown."""
    labels = [x for r in rows for x in r["labels"]]
    sources = Counter(r["source"] for r in rows)
    return {"rows": len(rows), "rows_by_source": dict(sorted(sources.items())),
            "records_by_kind": dict(sorted(kinds.items())), "disagree": dict(sorted(disagree.items())),
            "disagree_total": sum(disagree.values()), "steps": len(labels),
            "negative_steps": labels.count(False),
            "negative_fraction": labels.count(False) / len(labels) if labels else 0.0}


def build_outcome_rows(samples: Iterable[Mapping[str, Any]], task: Task, round_index: int = 1) -> list[dict[str, Any]]:
    """Every graded sample as an outcome-labelled row (all its steps, each labelled with its final-answer
    grade): the data of the outcome verifier (`PRMDataModule(labels="outcome")` reads the last label)."""
    return [outcome_row(s, steps, round_index) for s in samples if (steps := task.split_steps(s["completion"]))]


def split_by_question(rows: Sequence[Mapping[str, Any]], val_fraction: float, seed: int = 0
                      ) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """(train, held-out) rows, whole questions on one side (a question's rationales share steps, so a
    split within a question would leak them); each question's side is a fixed function of seed and id."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    held = {q for q in {r["question_id"] for r in rows}
            if derive_seed(seed, "prm_split", q) / 2**63 < val_fraction}
    return [r for r in rows if r["question_id"] not in held], [r for r in rows if r["question_id"] in held]
