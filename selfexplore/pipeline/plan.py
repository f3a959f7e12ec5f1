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


def planned_units(rounds: int, baselines: Sequence[str], verifiers: Sequence[str] = ()) -> list[str]:
    """Top-level unit names, in run order (an `.../eval` unit includes its sample files).

    `verifiers`: the verifiers each round trains ('process', 'outcome'); with any, each policy's
    evaluation is followed by its verifier-guided selection.
    """
    def evaluated(stage: str) -> list[str]:
        return [stage, eval_unit(stage), *([selection_unit(stage)] if verifiers else [])]

    def explored(r: int) -> list[str]:
        return [*exploration_units(r), *(verifier_unit(r, labels) for labels in verifiers)]

    units = [BASE, *evaluated(SFT)[:2], SFT_SAMPLES, RFT_DATA, RFT, eval_unit(RFT), *explored(1),
             *([selection_unit(RFT)] if verifiers else [])]
    if "outcome_dpo" in baselines:
        units += evaluated(OUTCOME_DPO)
    if "self_explore" in baselines:
        for r in range(1, rounds + 1):
            units += [*(explored(r) if r > 1 else []), *evaluated(self_explore(r))]
    return units


def verifiers_of(verifier: dict[str, Any] | None) -> list[str]:
    """The verifiers a run's `verifier` settings (as recorded) train each round."""
    if not verifier:
        return []
    return ["process", *(["outcome"] if verifier.get("outcome", True) else [])]


def plan_of(config: dict[str, Any]) -> list[str]:
    """The plan of a run from its recorded config.json (what `PipelineConfig` was)."""
    return planned_units(int(config.get("rounds", 1)), config.get("baselines", []),
                         verifiers_of(config.get("verifier")))


def exploration_units(round_index: int) -> list[str]:
    """Round `round_index`'s explorer samples, outcome pairs, first-pit exploration and its prm rows."""
    return [round_unit(round_index, name) for name in ("explorer_samples.jsonl", "pairs", "explore", "prm")]


def verifier_unit(round_index: int, labels: str) -> str:
    """The unit that trains round `round_index`'s 'process' (step) or 'outcome' verifier."""
    return round_unit(round_index, "verifier" if labels == "process" else "outcome_verifier")


def selection_unit(stage_dir: str) -> str:
    """The unit that chooses among a stage's sampled test answers with the verifiers."""
    return f"{stage_dir}/selection"


def explorer(round_index: int) -> str:
    """The stage whose policy explores in round `round_index` (and starts its step-DPO)."""
    return RFT if round_index == 1 else self_explore(round_index - 1)


def inputs(unit: str, rft_init: str = "base") -> list[str]:
    """The units whose outputs `unit` reads (what `--force` must redo after them)."""
    head, _, rest = unit.partition("/")
    if unit == BASE:
        return []
    last = unit.rsplit("/", 1)[-1]
    if last.startswith("eval") or last == "selection_samples.jsonl":  # a stage's evaluation, or its samples
        return [unit.rsplit("/", 1)[0]]
    if last == "selection":
        stage = unit.rsplit("/", 1)[0]
        r = 1 if stage in (RFT, OUTCOME_DPO) else int(stage.partition("/")[0].removeprefix("round_"))
        return [stage, verifier_unit(r, "process"), verifier_unit(r, "outcome")]
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
    if rest == "prm":
        return [round_unit(r, "explore")]
    if rest in ("verifier", "outcome_verifier"):
        return [round_unit(r, "prm"), explorer(r)]
    if rest == "self_explore":
        return [round_unit(r, "explore"), explorer(r), RFT]  # RFT: the reference under 'keep'
    raise ValueError(f"unknown unit {unit!r}")


_WHAT = {"samples.jsonl": "sample the SFT policy", "rft_data": "RFT set", "rft": "RFT training",
         "explorer_samples.jsonl": "sample the explorer", "pairs": "outcome pairs",
         "explore": "first-pit exploration", "outcome_dpo": "outcome DPO training",
         "self_explore": "step-level DPO training", "sft": "SFT training", "prm": "process-reward rows",
         "verifier": "step verifier training", "outcome_verifier": "outcome verifier training"}
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
    if parts[-1] == "selection":
        what = f"verifier-guided answers of {_POLICY.get(parts[0], parts[0])}"
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
        return (f"{result['num_pits']} pits in {result['num_explored']} rationales"
                f" · {result['num_pairs']} granular pairs")
    if unit.endswith("/prm"):
        return f"{result['rows']} rows"
    if unit.endswith("verifier"):
        held = result.get("verifier", {})
        return (f"held-out step AUROC {held.get('auroc', float('nan')):.3f}"
                f" · first-error F1 {held.get('f1', float('nan')):.3f}")
    if unit.endswith("/selection"):
        return f"greedy {result['greedy']:.3f} · " + " · ".join(
            f"{name} {curve[str(result['samples_per_question'])]['mean']:.3f}"
            for name, curve in result["curves"].items() if name in ("majority", "process/weighted_vote", "pass_at_n"))
    return ""


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 07 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
