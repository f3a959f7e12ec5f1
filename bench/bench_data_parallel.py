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

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK_OPTIONS = {"train_size": 128, "validation_size": 8, "test_size": 64, "min_steps": 2, "max_steps": 3,
                "max_operand": 20, "operations": ["+", "-"]}
OUTPUTS = ("samples.jsonl", "explore/explore.jsonl", "explore/gpairs.jsonl", "eval.jsonl")


def emit(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def build_model(out: Path) -> None:
    from selfexplore.models import TinyLlamaConfig, build_tiny_llama
    from selfexplore.tasks import get_task

    task = get_task("arith", **TASK_OPTIONS)
    texts = [task.prompt(p) + p.solution for p in task.load("train")]
    build_tiny_llama(texts, out, TinyLlamaConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                                 intermediate_size=128, vocab_size=300,
                                                 max_position_embeddings=256))


def worker(model: str, out: str, shard_size: int) -> None:
    """One rank: the three units with the rank's share of every shard folder (rank 0 merges)."""
    import torch

    from selfexplore.explore.config import ExploreConfig
    from selfexplore.explore.stage import run_explore_stage
    from selfexplore.io import read_jsonl, write_jsonl
    from selfexplore.sampling import SamplingConfig, get_sampler, run_sample_stage
    from selfexplore.shards import Workers
    from selfexplore.tasks import get_task

    torch.set_num_threads(1)
    workers = Workers.from_environment()
    task = get_task("arith", **TASK_OPTIONS)
    train, test = task.load("train"), task.load("test")
    run = Path(out)
    sampling = SamplingConfig(n=8, max_new_tokens=64, seed=0, shard_size=shard_size, batch_size=64)
    with get_sampler(sampling, model) as sampler:
        start = time.perf_counter()
        busy = time.process_time()
        run_sample_stage(sampler, task, train, run / "samples.jsonl", sampling, model="tiny", progress=False,
                         workers=workers)
        if workers.is_main:  # pairs: gold chosen; rejected: the gold steps with a wrong final answer
            gold = {p.id: p for p in train}
            pairs = []
            for r in read_jsonl(run / "samples.jsonl"):
                problem = gold[r["question_id"]]
                wrong = problem.solution.rsplit(" ", 1)[0] + f" {int(problem.answer) + 1 + int(r['id'][-1])}"
                pairs.append({"prompt": r["prompt"], "chosen": problem.solution, "rejected": wrong,
                              "meta": {"question_id": r["question_id"], "rejected_id": r["id"], "chosen_id": "gold"}})
            write_jsonl(run / "pairs.jsonl", pairs)
        else:
            while not (run / "pairs.jsonl").is_file():
                time.sleep(0.05)
        run_explore_stage(sampler, task, run / "pairs.jsonl", {p.id: p for p in train}, run / "explore",
                          ExploreConfig(k=2, max_new_tokens=32, chunk_size=shard_size, seed=1), model="tiny",
                          workers=workers)
        greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=48, seed=0, shard_size=shard_size)
        run_sample_stage(sampler, task, test, run / "eval.jsonl", greedy, model="tiny", progress=False,
                         workers=workers)
        wall = time.perf_counter() - start
        emit(role="rank", rank=workers.rank, world_size=workers.world_size, units_seconds=round(wall, 3),
             busy_seconds=round(time.process_time() - busy, 3),
             idle_seconds=round(max(0.0, wall - (time.process_time() - busy)), 3))


def run_config(model: Path, world: int, shard_size: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"bench_dp{world}_") as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world)}
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(model), tmp, str(shard_size)],
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                                  text=True) for r in range(world)]
        ranks = []
        for p in procs:
            stdout, _ = p.communicate(timeout=1200)
            if p.returncode:
                raise RuntimeError(f"a rank failed (exit {p.returncode})")
            ranks += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        hashes = {name: hashlib.sha256((Path(tmp) / name).read_bytes()).hexdigest()[:16] for name in OUTPUTS}
    return {"world_size": world, "units_seconds": max(r["units_seconds"] for r in ranks), "ranks": ranks,
            "sha256": hashes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard_size", type=int, default=8)
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "OUT", "SHARD_SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return
    with tempfile.TemporaryDirectory(prefix="bench_dp_model_") as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        results: dict[int, list[dict[str, object]]] = {1: [], 2: []}
        for repeat in range(args.repeats):  # alternated, so load drifts hit both alike
            for world in (1, 2):
                result = run_config(model, world, args.shard_size)
                results[world].append(result)
                emit(bench="data_parallel_run", repeat=repeat, **result, load_avg=os.getloadavg()[0])
    one = statistics.median(r["units_seconds"] for r in results[1])
    two = statistics.median(r["units_seconds"] for r in results[2])
    emit(bench="data_parallel", units="sample+explore+eval", median_seconds_1_process=round(one, 3),
         median_seconds_2_processes=round(two, 3), ratio=round(two / one, 3), repeats=args.repeats,
         identical_outputs=all(r["sha256"] == results[1][0]["sha256"] for rs in results.values() for r in rs),
         sha256=results[1][0]["sha256"])


if __name__ == "__main__":
    main()
