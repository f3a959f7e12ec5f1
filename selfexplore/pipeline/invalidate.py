"""What `pipeline --force` redoes when the configuration of an existing run changed.

Units run in a fixed order and each reads what the ones before it wrote, so a changed setting
invalidates the first unit that reads it and every unit completed after that one. Evaluation
settings are the exception: nothing reads an evaluation, so only evaluations are redone. The
rules are pure functions of the two configs and the completed units (in completion order).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Settings that only the evaluation units read.
EVAL_KEYS = ("eval_split", "eval_limit", "eval_max_new_tokens", "eval_samples")
# Settings that decide which baselines run, not how any unit computes (run_dir: recorded by
# run directories made before it left the fingerprint).
SCOPE_KEYS = ("baselines", "run_dir")
# Top-level setting -> names of the units that read it first (the earliest of them present,
# and everything completed after it, is redone). A setting not listed redoes every unit.
FIRST_READERS: dict[str, tuple[str, ...]] = {
    "sft": ("round_0/sft",),
    "sft_questions": ("round_0/sft",),
    "sampling": ("round_0/sft/eval.jsonl", "round_1/samples.jsonl"),
    "train_questions": ("round_1/samples.jsonl",),
    "sample_questions": ("round_1/samples.jsonl",),
    "rft": ("round_1/rft_data",),
    "rft_max_per_question": ("round_1/rft_data",),
    "rft_include_gold": ("round_1/rft_data",),
    "rft_init": ("round_1/rft",),
    "pairs_include_gold": ("round_1/pairs",),
    "explore": ("round_1/explore",),
    "dpo": ("round_1/outcome_dpo", "round_1/self_explore"),
    "reference_update": ("round_2/self_explore",),  # round 1's reference is the RFT policy either way
}
_ROUND = re.compile(r"^round_(\d+)/")


def _is_eval(unit: str) -> bool:
    return unit.rsplit("/", 1)[-1].startswith("eval")


def units_to_redo(changed: Sequence[str], units: Sequence[str], rounds: int) -> list[str]:
    """The completed `units` (in completion order) that the `changed` dotted keys invalidate."""
    redo: set[str] = set()
    for key in changed:
        top = key.split(".", 1)[0]
        if top in EVAL_KEYS:
            redo.update(u for u in units if _is_eval(u))
        elif top == "rounds":
            redo.update(u for u in units if (m := _ROUND.match(u)) and int(m.group(1)) > rounds)
        elif top in SCOPE_KEYS:
            continue
        else:
            readers = FIRST_READERS.get(top)
            first = next((i for i, u in enumerate(units) if readers is None or u in readers), None)
            if first is not None:
                redo.update(units[first:])
    return [u for u in units if u in redo]
