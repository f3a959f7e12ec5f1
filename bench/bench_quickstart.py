"""Bench: the quickstart end to end, wall time split by stage, accuracy per stage, over seeds.

Question: how long does `selfexplore pipeline --config configs/quickstart.yaml` take on this
machine, where does the time go, and does the paper's ordering (Self-Explore > outcome DPO >
RFT > SFT, round 2 >= round 1) hold across seeds? Each seed is a fresh run directory driven
through the real CLI in a subprocess (`--pipeline.seed`, `--pipeline.run_dir` overrides), so
what is timed is exactly what a user runs. Afterwards the script reads each run's
`state.json` (every unit records its wall time) and prints one JSON line per seed and stage
(accuracy lines also give the test questions fixed and broken against the policy the stage
builds on, with the exact McNemar p-value: is the difference more than split noise?),
then a summary line per stage (median seconds over seeds) and per trained policy (mean and
sample standard deviation of accuracy), and markdown tables of the summary (greedy accuracy,
and sampled accuracy when the config sets `eval_samples`).

    OMP_NUM_THREADS=2 python bench/bench_quickstart.py --seeds 0 1 2 --work-dir runs/bench_quickstart
    (about 10-15 minutes per seed on 2 quiet cores; a rerun reuses finished runs, resumes others)

`--smoke` runs one seed of the config shrunk to a few questions, one epoch and one round, in a
temporary folder.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from _harness import bench_parser, emit, median, parse_args

from selfexplore.models.tiny import TINY_SHAPES
from selfexplore.pipeline.report import changes, own_seconds, report_rows

ROOT = Path(__file__).resolve().parent.parent

STAGES = (  # (stage, predicate on the unit name); the first match wins
    ("build base model", lambda u: u == "base"),
    ("evaluate (greedy)", lambda u: u.endswith(("/eval.jsonl", "/eval"))),
    ("train SFT", lambda u: u == "round_0/sft"),
    ("train RFT", lambda u: u.endswith(("/rft", "/rft_data"))),
    ("sample", lambda u: u.endswith(("samples.jsonl", "/pairs"))),
    ("explore", lambda u: u.endswith("/explore")),
    ("train outcome DPO", lambda u: u.endswith("/outcome_dpo")),
    ("train Self-Explore", lambda u: u.endswith("/self_explore")),
)
SMOKE_TASK = {"train_size": 300, "validation_size": 8, "test_size": 16}


def stage_of(unit: str) -> str:
    return next((name for name, match in STAGES if match(unit)), "other")


def smoke_config(config: Path, out: Path) -> Path:
    """`config` shrunk to seconds: fewer questions, the test suite's model, short stages, one round. Gold
    rationales may be the chosen side, as a briefly trained policy rarely answers right."""
    cfg = yaml.safe_load(config.read_text())
    pipeline = cfg["pipeline"]
    pipeline["task_options"] = {**pipeline.get("task_options", {}), **SMOKE_TASK}
    pipeline["from_scratch"] = TINY_SHAPES["test"]
    for stage, epochs in (("sft", 12), ("rft", 1), ("dpo", 1)):
        pipeline[stage]["epochs"] = epochs
    pipeline["rft"]["optimizer"]["lr"] = 1e-6  # one RFT epoch would unlearn the short SFT's answer format
    pipeline["sampling"]["n"] = 4
    pipeline["explore"]["k"] = 2
    pipeline.update(train_questions=16, rounds=1, pairs_include_gold=True)
    out.write_text(yaml.safe_dump(cfg))
    return out


def stage_seconds(units: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Wall seconds per stage."""
    out: dict[str, float] = defaultdict(float)
    for unit, seconds in own_seconds(units).items():
        out[stage_of(unit)] += seconds
    return dict(out)


def run_seed(config: Path, seed: int, run_dir: Path, threads: int | None) -> float:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, str(ROOT / "cli.py"), "pipeline", "--config", str(config),
           "--pipeline.seed", str(seed), "--pipeline.run_dir", str(run_dir),
           "--pipeline.trainer.enable_progress_bar", "false"]
    log = run_dir.with_suffix(".log")
    start = time.perf_counter()
    with log.open("a") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        sys.stderr.write(log.read_text()[-6000:])
        raise RuntimeError(f"the pipeline of seed {seed} failed (exit {code}); log: {log}")
    return time.perf_counter() - start


def summary_table(rows_by_seed: dict[int, list[dict[str, Any]]], metric: str = "accuracy") -> str:
    """Markdown: `metric` (%) per trained policy and seed, then mean and sample std ('-': not run)."""
    by_policy: dict[tuple[str, int], dict[int, float]] = defaultdict(dict)
    for seed, rows in rows_by_seed.items():
        for row in rows:
            if row.get(metric) is not None:
                by_policy[(row["stage"], row["round"])][seed] = 100 * row[metric]
    seeds = sorted(rows_by_seed)
    lines = ["| stage | round | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std |",
             "|---|---|" + "---|" * (len(seeds) + 2)]
    for (stage, rnd), accs in by_policy.items():
        values = list(accs.values())
        std = f"{statistics.stdev(values):.1f}" if len(values) > 1 else "-"
        cells = " | ".join(f"{accs[s]:.1f}" if s in accs else "-" for s in seeds)
        lines.append(f"| {stage} | {rnd} | {cells} | {statistics.mean(values):.1f} | {std} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__, repeats=None)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench_quickstart"))
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the runs (default: inherited)")
    args = parse_args(parser, argv, smoke={"seeds": [0], "work_dir": None})
    with tempfile.TemporaryDirectory(prefix="bench_quickstart_") as tmp:
        if args.smoke:
            args.config = smoke_config(args.config, Path(tmp) / "smoke.yaml")
        sweep(args.config, args.seeds, args.work_dir or Path(tmp), args.threads)


def sweep(config: Path, seeds: list[int], work_dir: Path, threads: int | None) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    per_stage: dict[str, list[float]] = defaultdict(list)
    rows_by_seed: dict[int, list[dict[str, Any]]] = {}
    for seed in seeds:
        run_dir = work_dir / f"seed{seed}"
        wall = run_seed(config, seed, run_dir, threads)
        state = json.loads((run_dir / "state.json").read_text())
        units = state["units"]
        seconds = stage_seconds(units)
        for stage, value in seconds.items():
            per_stage[stage].append(value)
            emit(kind="stage", seed=seed, stage=stage, seconds=round(value, 1))
        total = sum(seconds.values())
        per_stage["total (units)"].append(total)
        emit(kind="run", seed=seed, units_seconds=round(total, 1), this_invocation_seconds=round(wall, 1))
        rounds = sum(1 for u in units if u.endswith("/self_explore"))
        rows_by_seed[seed] = report_rows(units, rounds)
        changed = changes(run_dir, rows_by_seed[seed])
        for row in rows_by_seed[seed]:
            change = changed.get(row["unit"])
            emit(kind="accuracy", seed=seed, stage=row["stage"], round=row["round"], accuracy=row["accuracy"],
                 sampled_accuracy=row["sampled_accuracy"], builds_on=row["builds_on"],
                 fixed=change and change.fixed, broken=change and change.broken,
                 mcnemar_p=change and round(change.p_value, 4))
    total = median(per_stage["total (units)"])
    for stage, values in per_stage.items():
        seconds = median(values)
        emit(kind="summary", stage=stage, median_seconds=round(seconds, 1), seeds=len(values),
             share=round(seconds / total, 3))
    print("greedy accuracy (%)\n" + summary_table(rows_by_seed))
    if any(row["sampled_accuracy"] is not None for rows in rows_by_seed.values() for row in rows):
        print("\nsampled accuracy (%)\n" + summary_table(rows_by_seed, "sampled_accuracy"))


if __name__ == "__main__":
    main()
