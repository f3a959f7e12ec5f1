"""Per-run report: `report.md` (table per stage and round) and `report.png` (accuracy, pits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selfexplore.io import atomic_open, atomic_write_text
from selfexplore.pipeline.card import write_model_cards
from selfexplore.pipeline.compare import PairedChange, correct_by_question, paired_change
from selfexplore.pipeline.layout import OUTCOME_DPO, RFT, SFT, RunLayout, eval_unit, round_unit, self_explore
from selfexplore.pipeline.plan import SFT_SAMPLES, explorer, selection_unit, verifier_unit


def report_rows(units: dict[str, dict[str, Any]], rounds: int) -> list[dict[str, Any]]:
    """One row per trained policy: greedy (and sampled) accuracy, pass@N of its samples, pairs, pits, tokens, time.

    `unit` names the policy's unit and `builds_on` the unit of the policy the row is compared
    with (RFT: SFT, whose samples it trains on; outcome DPO and round 1: RFT; round r: round r-1).
    """
    def get(unit: str, key: str) -> Any:
        return units.get(unit, {}).get(key)

    def row(stage: str, round_: int, policy_unit: str, builds_on: str | None, **rest: Any) -> dict[str, Any]:
        return {"stage": stage, "round": round_, "unit": policy_unit, "builds_on": builds_on,
                "accuracy": get(eval_unit(policy_unit), "accuracy"),
                "sampled_accuracy": get(eval_unit(policy_unit), "sampled_accuracy"),
                "seconds": get(policy_unit, "seconds"), "pit_at_first_error": None, **rest}

    explorer_samples = [round_unit(r, "explorer_samples.jsonl") for r in range(rounds + 2)]
    rows = [row("SFT", 0, SFT, None, pass_at_n=get(SFT_SAMPLES, "pass_at_n"), pairs=None, pits=None,
                tokens=get(SFT_SAMPLES, "generated_tokens")),
            row("RFT", 1, RFT, SFT, pass_at_n=get(explorer_samples[1], "pass_at_n"),
                pairs=get(round_unit(1, "pairs"), "pairs"), pits=None,
                tokens=get(explorer_samples[1], "generated_tokens")),
            row("Outcome DPO", 1, OUTCOME_DPO, RFT, pass_at_n=None, pairs=get(round_unit(1, "pairs"), "pairs"),
                pits=None, tokens=None)]
    for r in range(1, rounds + 1):
        explore = units.get(round_unit(r, "explore"), {})
        rows.append(row("Self-Explore", r, self_explore(r), explorer(r),
                        pass_at_n=get(explorer_samples[r + 1], "pass_at_n"),
                        pairs=explore.get("num_pairs"), pits=explore.get("pit_histogram"),
                        pit_at_first_error=explore.get("pit_at_first_error"),
                        tokens=explore.get("tokens_generated")))
    return [row for row in rows if row["accuracy"] is not None]


def changes(run_dir: str | Path, rows: list[dict[str, Any]]) -> dict[str, PairedChange]:
    """Per row unit: test questions fixed and broken against the policy it builds on (both evaluated)."""
    def graded(unit: str) -> dict[str, bool] | None:
        path = RunLayout(run_dir).greedy_eval(unit)
        return correct_by_question(path) if path.is_file() else None

    out = {}
    for row in rows:
        before = graded(row["builds_on"]) if row["builds_on"] else None
        after = graded(row["unit"]) if before is not None else None
        if after is not None:
            out[row["unit"]] = paired_change(before, after)
    return out


def own_seconds(units: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Wall seconds per top-level unit: the sample files an evaluation or a selection unit wraps are
    counted in it, not again on their own."""
    def wrapped(unit: str) -> bool:
        stage, _, name = unit.rpartition("/")
        wrapper = {"eval.jsonl": "eval", "eval_sampled.jsonl": "eval", "selection_samples.jsonl": "selection"}
        return name in wrapper and f"{stage}/{wrapper[name]}" in units

    return {unit: float(result.get("seconds", 0.0)) for unit, result in units.items() if not wrapped(unit)}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, dict):
        return " ".join(f"{k}:{v}" for k, v in value.items()) or "-"
    return str(value)


def write_report(run_dir: str | Path, units: dict[str, dict[str, Any]], config: Any) -> Path:
    """Write report.md and report.png under `run_dir`, and each policy's model card; returns the markdown path."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    rows = report_rows(units, config.rounds)
    sampled = any(row["sampled_accuracy"] is not None for row in rows)
    checked = any(row["pit_at_first_error"] is not None for row in rows)
    changed = changes(run_dir, rows)
    for row in rows:
        row["change"] = changed.get(row["unit"])
    header = ["stage", "round", "accuracy", *(["change"] if changed else []),
              *(["sampled_accuracy"] if sampled else []), "pass_at_n", "pairs",
              "pits", *(["pit_at_first_error"] if checked else []), "tokens", "seconds"]
    sampled_note = (f" sampled_accuracy is the mean accuracy of {config.eval_samples} answers per question sampled "
                    f"at temperature {config.sampling.temperature};" if sampled else "")
    checked_note = (" pit_at_first_error is the fraction of those pits that are the first step departing from the "
                    "gold rationale (the task's rationales are canonical)." if checked else "")
    change_note = (" change compares greedy answers with the policy the row builds on (RFT: SFT; outcome DPO "
                   "and Self-Explore round 1: RFT; round r: round r-1): +questions it fixed, -questions it broke, "
                   "and the exact McNemar p-value (a small p: more than split noise)." if changed else "")
    lines = [f"# Self-Explore run: {run_dir.name}", "",
             f"task `{config.task}`, eval split `{config.eval_split}`, seed {config.seed}; accuracy is greedy "
             f"accuracy on the {config.eval_split} split;{sampled_note} pass_at_n is over the policy's own samples "
             "of the training questions; pits is the first-pit step histogram of the exploration that made that "
             f"round's pairs.{checked_note}{change_note}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(row[h]) for h in header) + " |" for row in rows]
    total = sum(own_seconds(units).values())
    lines += ["", f"Total wall time of completed units: {total:.0f} s", "", "![report](report.png)", ""]
    selections = {row["unit"]: units[selection_unit(row["unit"])]
                  for row in rows if selection_unit(row["unit"]) in units}
    lines += verifier_lines(units, config.rounds) + selection_lines(rows, selections)
    path = layout.report_md
    atomic_write_text(path, "\n".join(lines))
    _plot(rows, layout.report_png)
    if selections:
        _save(selection_figure(rows, selections), layout.report_selection_png)
    write_model_cards(run_dir, rows, config)
    return path


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    _save(figure(rows), out)


def _save(fig: Any, out: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


VERIFIER_METRICS = ("auroc", "balanced_accuracy", "negative_f1", "acc_err", "acc_cor", "f1")


def verifier_lines(units: dict[str, dict[str, Any]], rounds: int) -> list[str]:
    """A table per round of the held-out metrics of its verifiers, of the flag-the-last-step baseline
    and of each DPO policy's implicit reward (on the same rows)."""
    rows = []
    for r in range(1, rounds + 1):
        for labels in ("process", "outcome"):
            result = units.get(verifier_unit(r, labels))
            if result is None:
                continue
            rows.append((r, f"{labels} verifier", result["verifier"]))
            if labels == "process":
                rows.append((r, "flag the last step", result["flag_last_baseline"]))
        stages = [OUTCOME_DPO] if r == 1 else []
        for stage in (*stages, self_explore(r)):
            implicit = units.get(selection_unit(stage), {}).get("implicit_held_out")
            if implicit is not None:
                rows.append((r, f"implicit reward of {stage}", implicit))
    if not rows:
        return []
    header = ["round", "scorer", *VERIFIER_METRICS]
    return ["## Step verifiers", "",
            "Held-out explored and outcome rationales (whole questions the verifier never trained on). Step metrics "
            "are balanced for mostly-positive labels; acc_err: the first step scored bad is the pit; acc_cor: no step "
            "scored bad on a correct rationale; f1: their harmonic mean (ProcessBench's first-error F1). "
            "Verifiers flag a step at P(good) < 0.5, the implicit reward at beta * log(pi / pi_ref) < 0.", "",
            "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join([str(r), name, *(_fmt(m.get(k)) for k in VERIFIER_METRICS)]) + " |"
              for r, name, m in rows), ""]


def selection_lines(rows: list[dict[str, Any]], selections: dict[str, dict[str, Any]]) -> list[str]:
    """Per policy: accuracy vs N of every selector (mean [interval] over resampled subsets) and its
    paired change against the greedy answers at the largest N."""
    if not selections:
        return []
    lines = ["## Verifier-guided answers", "",
             "The same sampled answers per test question, chosen among by each selector; mean [interval] over "
             "resampled subsets of N answers; change: the selector at the largest N against greedy decoding "
             "(+fixed -broken questions, exact McNemar p). Scorers: process = the step verifier, outcome = the "
             "outcome verifier, implicit = the policy's own beta * log(pi / pi_ref) per step; best_of_n and "
             "weighted_vote take a rationale's minimum step score, best_of_n_last its last.", ""]
    names = {row["unit"]: _row_name(row) for row in rows}
    for unit, result in selections.items():
        ns = list(next(iter(result["curves"].values())))
        header = ["selector", *(f"N={n}" for n in ns), "change"]
        lines += [f"### {names[unit]} (greedy {result['greedy']:.3f})", "",
                  "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name, curve in result["curves"].items():
            cells = [f"{curve[n]['mean']:.3f} [{curve[n]['low']:.3f}, {curve[n]['high']:.3f}]" for n in ns]
            lines.append("| " + " | ".join([name, *cells, result["change"].get(name, "-")]) + " |")
        lines.append("")
    return lines + ["![verifier-guided answers](report_selection.png)", ""]


def _row_name(row: dict[str, Any]) -> str:
    return row["stage"] if row["stage"] != "Self-Explore" else f"Self-Explore r{row['round']}"


def selection_figure(rows: list[dict[str, Any]], selections: dict[str, dict[str, Any]]) -> Any:
    """Accuracy vs N per selector, one panel per policy, greedy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {row["unit"]: _row_name(row) for row in rows}
    fig, axes = plt.subplots(1, len(selections), figsize=(5 * len(selections), 4), squeeze=False)
    for ax, (unit, result) in zip(axes[0], selections.items()):
        for name, curve in result["curves"].items():
            ns = [int(n) for n in curve]
            ax.errorbar(ns, [100 * curve[str(n)]["mean"] for n in ns], capsize=2, marker="o", markersize=3,
                        yerr=[[max(0.0, 100 * (curve[str(n)]["mean"] - curve[str(n)]["low"])) for n in ns],
                              [max(0.0, 100 * (curve[str(n)]["high"] - curve[str(n)]["mean"])) for n in ns]],
                        label=name)  # max: float rounding where every subset is the same (N = all samples)
        ax.axhline(100 * result["greedy"], color="k", linestyle="--", linewidth=1, label="greedy")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("answers per question (N)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(names[unit], fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def figure(rows: list[dict[str, Any]]) -> Any:
    """Accuracy bars (a tick at the accuracy of the policy each builds on, and its paired change)
    beside the first-pit histogram as bars over integer steps, one group per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_pit) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [r["stage"] if r["stage"] != "Self-Explore" else f"Self-Explore r{r['round']}" for r in rows]
    accs = [100 * r["accuracy"] for r in rows]
    by_unit = dict(zip((r["unit"] for r in rows), accs))
    colors = {"SFT": "#999", "RFT": "#6a9", "Outcome DPO": "#58c", "Self-Explore": "#d62"}
    ax_acc.bar(range(len(rows)), accs, color=[colors[r["stage"]] for r in rows], tick_label=labels)
    for i, (row, a) in enumerate(zip(rows, accs)):
        change = row.get("change")
        before = by_unit.get(row["builds_on"])
        if before is not None:  # where the policy it builds on stood: the bar's rise or fall from there
            ax_acc.hlines(before, i - 0.4, i + 0.4, colors="k", linestyles="dashed", linewidth=1)
        note = f"\n+{change.fixed} -{change.broken}, p={change.p_value:.2g}" if change is not None else ""
        ax_acc.text(i, max(a, before or 0) + 1, f"{a:.1f}{note}", ha="center", va="bottom", fontsize=8,
                    fontweight="bold" if change is not None and change.p_value < 0.05 else "normal")
    sampled = [(i, 100 * r["sampled_accuracy"]) for i, r in enumerate(rows) if r.get("sampled_accuracy") is not None]
    if sampled:
        ax_acc.plot(*zip(*sampled), "kD", label="sampled")
        ax_acc.legend(loc="lower right")
    ax_acc.set_ylim(0, min(100, max(accs, default=0) + 25))
    ax_acc.set_ylabel("greedy accuracy (%)" + (", diamonds: sampled" if sampled else ""))
    ax_acc.set_title("Accuracy; dashed: the policy it builds on; +fixed -broken questions", fontsize=10)
    ax_acc.tick_params(axis="x", rotation=20)
    explored = [r for r in rows if r["pits"]]
    steps = sorted({int(k) for r in explored for k in r["pits"]})
    width = 0.8 / max(len(explored), 1)
    for j, row in enumerate(explored):
        offset = (j - (len(explored) - 1) / 2) * width
        ax_pit.bar([s + offset for s in steps], [row["pits"].get(str(s), 0) for s in steps], width,
                   label=f"round {row['round']}")
    ax_pit.set_xticks(steps)
    ax_pit.set_xlabel("first-pit step")
    ax_pit.set_ylabel("rationales")
    ax_pit.set_title("First-pit positions per round")
    if explored:
        ax_pit.legend()
    fig.tight_layout()
    return fig
