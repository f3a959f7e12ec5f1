"""The units of a run in the order `Pipeline.run` does them, and how a person reads each.

Both the console (`[7/24] round 1 · explore`) and `selfexplore status` (what comes next) need
the whole sequence before it runs, and `status` must not import the training stack, so the
plan lives here, as plain names from three settings. A test checks that a miniature run
completes exactly these units, in this order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def planned_units(rounds: int, baselines: Sequence[str]) -> list[str]:
    """Top-level unit names, in run order (an `.../eval` unit includes its sample files)."""
    units = ["base", "round_0/sft", "round_0/sft/eval", "round_1/samples.jsonl", "round_1/rft_data",
             "round_1/rft", "round_1/rft/eval", *_exploration(1)]
    if "outcome_dpo" in baselines:
        units += ["round_1/outcome_dpo", "round_1/outcome_dpo/eval"]
    if "self_explore" in baselines:
        for r in range(1, rounds + 1):
            units += [f"round_{r}/self_explore", f"round_{r}/self_explore/eval"]
            units += _exploration(r + 1) if r < rounds else []
    return units


def plan_of(config: dict[str, Any]) -> list[str]:
    """The plan of a run from its recorded config.json (what `PipelineConfig` was)."""
    return planned_units(int(config.get("rounds", 1)), config.get("baselines", []))


def _exploration(round_index: int) -> list[str]:
    rd = f"round_{round_index}"
    return [f"{rd}/explorer_samples.jsonl", f"{rd}/pairs", f"{rd}/explore"]


_WHAT = {"samples.jsonl": "sample the SFT policy", "rft_data": "RFT set", "rft": "RFT training",
         "explorer_samples.jsonl": "sample the explorer", "pairs": "outcome pairs",
         "explore": "first-pit exploration", "outcome_dpo": "outcome DPO training",
         "self_explore": "step-level DPO training", "sft": "SFT training"}
_POLICY = {"sft": "SFT", "rft": "RFT", "outcome_dpo": "outcome DPO", "self_explore": "Self-Explore"}


def label(unit: str) -> str:
    """'round_1/explore' -> 'round 1 · first-pit exploration'; 'round_1/rft/eval' -> 'round 1 · evaluate RFT'."""
    if unit == "base":
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
