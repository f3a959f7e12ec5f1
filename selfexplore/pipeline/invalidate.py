"""What `pipeline --force` redoes when the configuration of an existing run changed.

A changed setting invalidates the units that read it, and every unit that reads (directly or
through others) what those wrote (`plan.inputs`); nothing else. So a changed exploration
setting retrains the Self-Explore rounds but not outcome DPO, which never reads an exploration.
The rules are pure functions of the changed keys and the completed units.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from selfexplore.pipeline.layout import OUTCOME_DPO, RFT, SFT
from selfexplore.pipeline.plan import RFT_DATA, inputs

# Settings that only the evaluation units read.
EVAL_KEYS = ("eval_split", "eval_limit", "eval_max_new_tokens", "eval_samples")
# Settings that decide which baselines run, not how any unit computes (run_dir: recorded by
# run directories made before it left the fingerprint).
SCOPE_KEYS = ("baselines", "run_dir")
_ROUND = re.compile(r"^round_(\d+)/")


def _is_eval(unit: str) -> bool:
    return unit.rsplit("/", 1)[-1].startswith("eval")


def _last(unit: str) -> str:
    return unit.rsplit("/", 1)[-1]


def _verifies(unit: str) -> bool:
    """The verifier units and the selections that use them (with the samples they choose among)."""
    return _last(unit) in ("verifier", "outcome_verifier", "selection", "selection_samples.jsonl")


def _samples_train_questions(unit: str) -> bool:
    return _last(unit) in ("samples.jsonl", "explorer_samples.jsonl")


def _samples(unit: str) -> bool:
    """Units that draw from a sampler: sampling, exploration and every evaluation."""
    return (_samples_train_questions(unit) or _last(unit) in ("explore", "selection_samples.jsonl")
            or _is_eval(unit))


# Top-level setting -> which units read it themselves. A setting not listed is read by every unit.
READERS: dict[str, Callable[[str], bool]] = {
    "sft": lambda u: u == SFT,
    "sft_questions": lambda u: u in (SFT, RFT_DATA) or _samples_train_questions(u),  # gold set, held-out pool
    "sampling": _samples,  # exploration inherits the stop strings and the backend
    "train_questions": _samples_train_questions,
    "sample_questions": _samples_train_questions,
    "rft": lambda u: u == RFT,
    "rft_init": lambda u: u == RFT,
    "rft_max_per_question": lambda u: u == RFT_DATA or _last(u) == "pairs",
    "rft_include_gold": lambda u: u == RFT_DATA,
    "pairs_include_gold": lambda u: _last(u) == "pairs",
    "explore": lambda u: _last(u) == "explore",
    "prm": lambda u: _last(u) == "prm",
    "consensus": lambda u: _last(u) == "prm",
    "verifier": _verifies,
    "dpo": lambda u: u == OUTCOME_DPO or _last(u) == "self_explore",
    # round 1's reference is the RFT policy either way
    "reference_update": lambda u: _last(u) == "self_explore" and not u.startswith("round_1/"),
    **{key: _is_eval for key in EVAL_KEYS},
}


def units_to_redo(changed: Sequence[str], units: Sequence[str], rounds: int, rft_init: str = "base") -> list[str]:
    """The completed `units` (in completion order) that the `changed` dotted keys invalidate."""
    redo: set[str] = set()
    for key in changed:
        top = key.split(".", 1)[0]
        if top == "rounds":
            redo.update(u for u in units if (m := _ROUND.match(u)) and int(m.group(1)) > rounds)
        elif top not in SCOPE_KEYS:
            reads = READERS.get(top, lambda u: True)
            redo.update(u for u in units if reads(u))
    grew = True
    while grew:  # and every unit that reads a redone unit's output, transitively
        before = len(redo)
        redo.update(u for u in units if set(inputs(u, rft_init)) & redo)
        grew = len(redo) > before
    return [u for u in units if u in redo]
