"""Data-parallel sample + explore + eval units: 2 CPU processes against 1, side by side.

Each configuration runs the three non-training units of a round (sample the train questions,
explore the rejected rationales, greedy evaluation) on a tiny from-scratch Llama with the HF
backend and 1 thread per process; the 2-process runs are ranks 0 and 1 of one world (RANK /
WORLD_SIZE, as torchrun sets them), coordinating through the shard folders only. Prints one
JSON line per run and a summary: the median wall time of the units (after imports and model
load, which every rank pays once per run), the ratio, the merged files' sha256 (identical for
both world sizes), and each rank's busy (inside the engine) and idle seconds.

    python bench/bench_data_parallel.py --repeats 3
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import (
    alternated,
    bench_parser,
    build_arith_model,
    emit,
    median,
    parse_args,
    serve_worker,
    slipped_answer,
    spawn_worker,
    worker_result,
)

TASK_OPTIONS = {"train_size": 128, "validation_size": 8, "test_size": 64, "min_steps": 2, "max_steps": 3,
                "max_operand": 20, "operations": ["+", "-"]}
OUTPUTS = ("samples.jsonl", "explore/explore.jsonl", "explore/gpairs.jsonl", "eval.jsonl")


def worker(model: str, out: str, shard_size: int, task_options: dict[str, Any], n: int) -> dict[str, Any]:
    """One rank: the three units with the rank's share of every shard folder (rank 0 merges)."""
    import torch

    from selfexplore.explore.config import ExploreConfig
    from selfexplore.explore.stage import run_explore_stage
    from selfexplore.io import read_jsonl, write_jsonl
    from selfexplore.ranks import Workers, poll
    from selfexplore.sampling import SamplingConfig, get_sampler, run_sample_stage
    from selfexplore.shards import StageContext
    from selfexplore.tasks import get_task

    torch.set_num_threads(1)
    workers = Workers.from_environment()
    context = StageContext(model="tiny", workers=workers)
    task = get_task("arith", **task_options)
    train, test = task.load("train"), task.load("test")
    run = Path(out)
    sampling = SamplingConfig(n=n, max_new_tokens=64, seed=0, shard_size=shard_size, batch_size=64)
    with get_sampler(sampling, model) as sampler:
        start = time.perf_counter()
        busy = time.process_time()
        run_sample_stage(sampler, task, train, run / "samples.jsonl", sampling, context, progress=False)
        if workers.is_main:  # pairs: gold chosen; rejected: the gold steps with a wrong final answer
            gold = {p.id: p for p in train}
            pairs = []
            for r in read_jsonl(run / "samples.jsonl"):
                problem = gold[r["question_id"]]
                wrong = slipped_answer(problem, 1 + int(r["id"][-1]))
                pairs.append({"prompt": r["prompt"], "chosen": problem.solution, "rejected": wrong,
                              "meta": {"question_id": r["question_id"], "rejected_id": r["id"], "chosen_id": "gold"}})
            write_jsonl(run / "pairs.jsonl", pairs)
        else:
            poll((run / "pairs.jsonl").is_file)
        run_explore_stage(sampler, task, run / "pairs.jsonl", {p.id: p for p in train}, run / "explore",
                          ExploreConfig(k=2, max_new_tokens=32, chunk_size=shard_size, seed=1), context)
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=48, seed=0, shard_size=shard_size)
        run_sample_stage(sampler, task, test, run / "eval.jsonl", greedy, context, progress=False)
        wall = time.perf_counter() - start
        busy = time.process_time() - busy
    return {"rank": workers.rank, "world_size": workers.world_size, "units_seconds": round(wall, 3),
            "busy_seconds": round(busy, 3), "idle_seconds": round(max(0.0, wall - busy), 3)}


def run_config(model: Path, world: int, args: Any) -> dict[str, object]:
    """Ranks 0..world-1 of one world, side by side, as torchrun would start them."""
    with tempfile.TemporaryDirectory(prefix=f"bench_dp{world}_") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world)}
        payload = {"model": str(model), "out": tmp, "shard_size": args.shard_size, "task_options": args.task_options,
                   "n": args.n}
        procs = [spawn_worker(__file__, "rank", payload, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r in range(world)]
        ranks = [worker_result(p, timeout=1200) for p in procs]
        hashes = {name: hashlib.sha256((Path(tmp) / name).read_bytes()).hexdigest()[:16] for name in OUTPUTS}
    return {"world_size": world, "units_seconds": max(r["units_seconds"] for r in ranks), "ranks": ranks,
            "sha256": hashes}


def main(argv: Sequence[str] | None = None) -> None:
    if serve_worker({"rank": worker}, argv):
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--shard_size", type=int, default=8)
    parser.add_argument("--n", type=int, default=8, help="samples per train question")
    parser.add_argument("--task-options", type=json.loads, default=TASK_OPTIONS, help="arith knobs as JSON")
    args = parse_args(parser, argv, smoke={"repeats": 1, "n": 2, "task_options": {
        **TASK_OPTIONS, "train_size": 8, "test_size": 8}})
    with tempfile.TemporaryDirectory(prefix="bench_dp_model_") as tmp:
        model = build_arith_model(Path(tmp) / "model", "test", args.task_options)

        def run(world: int, repeat: int) -> dict[str, Any]:
            result = run_config(model, world, args)
            emit(bench="data_parallel_run", repeat=repeat, **result, load_avg=os.getloadavg()[0])
            return result

        results = alternated({1: lambda r: run(1, r), 2: lambda r: run(2, r)}, args.repeats)
    one = median(r["units_seconds"] for r in results[1])
    two = median(r["units_seconds"] for r in results[2])
    emit(bench="data_parallel", units="sample+explore+eval", median_seconds_1_process=round(one, 3),
         median_seconds_2_processes=round(two, 3), ratio=round(two / one, 3), repeats=args.repeats,
         identical_outputs=all(r["sha256"] == results[1][0]["sha256"] for rs in results.values() for r in rs),
         sha256=results[1][0]["sha256"])


if __name__ == "__main__":
    main()
