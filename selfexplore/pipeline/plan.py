"""The units of a run in the order `Pipeline.run` does them, what each reads, and how a person reads each.

The console (`[7/24] round 1 · explore`), `selfexplore status` (what comes next) and `--force`
(what a changed setting invalidates) need the whole sequence before it runs, and `status` must
not import the training stack, so the plan lives here, as plain names from a few settings. A
test checks that a miniature run completes exactly these units, in this order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from selfexplore.pipeline.layout import OUTCOME_DPO, RFT, SFT, eval_unit, round_unit, self_explore

BASE = "base"
RFT_DATA = round_unit(1, "rft_data")
SFT_SAMPLES = round_unit(1, "samples.jsonl")


def planned_units(rounds: int, baselines: Sequence[str]) -> list[str]:
    """Top-level unit names, in run order (an `.../eval` unit includes its sample files)."""
    units = [BASE, SFT, eval_unit(SFT), SFT_SAMPLES, RFT_DATA, RFT, eval_unit(RFT), *exploration_units(1)]
    if "outcome_dpo" in baselines:
        units += [OUTCOME_DPO, eval_unit(OUTCOME_DPO)]
    if "self_explore" in baselines:
        for r in range(1, rounds + 1):
            units += [*(exploration_units(r) if r > 1 else []), self_explore(r), eval_unit(self_explore(r))]
    return units


def plan_of(config: dict[str, Any]) -> list[str]:
    """The plan of a run from its recorded config.json (what `PipelineConfig` was)."""
    return planned_units(int(config.get("rounds", 1)), config.get("baselines", []))


def exploration_units(round_index: int) -> list[str]:
    """Round `round_index`'s explorer samples, outcome pairs and first-pit exploration."""
    return [round_unit(round_index, name) for name in ("explorer_samples.jsonl", "pairs", "explore")]


def explorer(round_index: int) -> str:
    """The stage whose policy explores in round `round_index` (and starts its step-DPO)."""
    return RFT if round_index == 1 else self_explore(round_index - 1)


def inputs(unit: str, rft_init: str = "base") -> list[str]:
    """The units whose outputs `unit` reads (what `--force` must redo after them)."""
    head, _, rest = unit.partition("/")
    if unit == BASE:
        return []
    if unit.rsplit("/", 1)[-1].startswith("eval"):  # an evaluation, or the sample file inside it
        return [unit.rsplit("/", 1)[0]]
    r = int(head.removeprefix("round_"))
    stage_inputs = {SFT: [BASE], SFT_SAMPLES: [SFT], RFT_DATA: [SFT_SAMPLES],
                    RFT: [RFT_DATA, BASE if rft_init == "base" else SFT],
                    OUTCOME_DPO: [round_unit(1, "pairs"), RFT]}
    if unit in stage_inputs:
        return stage_inputs[unit]
    if rest == "explorer_samples.jsonl":
        return [explorer(r)]
    if rest == "pairs":
        return [round_unit(r, "explorer_samples.jsonl")]
    if rest == "explore":
        return [round_unit(r, "pairs"), explorer(r)]
    if rest == "self_explore":
        return [round_unit(r, "explore"), explorer(r), RFT]  # RFT: the reference under 'keep'
    raise ValueError(f"unknown unit {unit!r}")


_WHAT = {"samples.jsonl": "sample the SFT policy", "rft_data": "RFT set", "rft": "RFT training",
         "explorer_samples.jsonl": "sample the explorer", "pairs": "outcome pairs",
         "explore": "first-pit exploration", "outcome_dpo": "outcome DPO training",
         "self_explore": "step-level DPO training", "sft": "SFT training"}
_POLICY = {"sft": "SFT", "rft": "RFT", "outcome_dpo": "outcome DPO", "self_explore": "Self-Explore"}


def label(unit: str) -> str:
    """'round_1/explore' -> 'round 1 · first-pit exploration'; 'round_1/rft/eval' -> 'round 1 · evaluate RFT'."""
    if unit == BASE:
        return "base model"
    head, _, rest = unit.partition("/")
    parts = rest.split("/")
    what = _WHAT.get(parts[-1], parts[-1])
    if parts[-1] == "eval":
        what = f"evaluate {_POLICY.get(parts[0], parts[0])}"
    return f"round {head.removeprefix('round_')} · {what}"


def key_figure(unit: str, result: dict[str, Any]) -> str:
    """The one or two numbers a person looks for in a finished unit's result."""
    if unit.endswith("/eval"):
        sampled = result.get("sampled_accuracy")
        return f"accuracy {result['accuracy']:.3f}" + (f" · sampled {sampled:.3f}" if sampled is not None else "")
    if unit.endswith(".jsonl"):
        return (f"pass@n {result['pass_at_n']:.3f} · pass rate {result['pass_rate_mean']:.3f} · "
                f"{result['generated_tokens']} tokens")
    if unit.endswith("/rft_data"):
        return f"{result['records']} examples"
    if unit.endswith("/pairs"):
        return f"{result['pairs']} pairs"
    if unit.endswith("/explore"):
        return f"{result['num_pits']} pits in {result['num_explored']} rationales · {result['num_pairs']} granular pairs"
    return ""


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 07 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
