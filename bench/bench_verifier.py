"""Bench: what the step verifier costs: training tokens/s, scoring cost per sampled answer, and (from a
finished run) the verifier units' share of a run's wall time.

Question: how much does the process-reward addition cost next to the method itself? Training is
timed as the raw step (forward at the step tags + BCE + backward + AdamW, no Lightning) on real
prm rows; scoring is `StepVerifierModule.score` on rationales, reported per rationale and per
token beside a plain LM forward over the same token ids (what any scorer pays at least). With
`--run DIR` (a finished `configs/quickstart-verifier.yaml` run) it also reads the units' seconds
from `state.json`: prm rows, verifier training, and the verifier-guided selection (sampling
included), against the whole run.

    OMP_NUM_THREADS=2 python bench/bench_verifier.py --run runs/quickstart-verifier
    python bench/bench_verifier.py --smoke          # seconds: an untrained tiny model, toy rows
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from _harness import alternated, bench_parser, build_arith_model, emit, median, parse_args, slipped_answer

from selfexplore.io import read_jsonl
from selfexplore.models import ModelSpec
from selfexplore.pipeline.report import own_seconds
from selfexplore.prm.tagging import prepare_verifier_base
from selfexplore.prm.verifier import PRMDataModule, StepVerifierModule, load_verifier, tag_loss
from selfexplore.tasks import get_task

TASK_OPTIONS = {"train_size": 64, "test_size": 8, "min_steps": 2, "max_steps": 4}


def toy_rows(count: int) -> list[dict[str, Any]]:
    """prm rows from arith problems: gold rationales all good, slipped ones bad at their last step."""
    task = get_task("arith", **TASK_OPTIONS)
    rows = []
    for i, problem in enumerate(task.load("train")[:count]):
        text = problem.solution if i % 2 else slipped_answer(problem)
        steps = task.split_steps(text)
        rows.append({"prompt": task.prompt(problem), "completions": steps,
                     "labels": [True] * (len(steps) - 1) + [bool(i % 2)], "question_id": problem.id})
    return rows


def time_training(base: Path, rows_path: Path, steps: int, batch_size: int) -> dict[str, float]:
    """`steps` raw training steps (after one warm-up step) on batches of the rows, cycled."""
    module = StepVerifierModule(ModelSpec(path=str(base)))
    module.configure_model()
    data = PRMDataModule(str(rows_path), str(rows_path), tokenizer_path=str(base), max_length=256,
                         batch_size=batch_size)
    data.setup("fit")
    batches = [data.collate([data.train_dataset[i] for i in range(j, min(j + batch_size, len(data.train_dataset)))])
               for j in range(0, len(data.train_dataset), batch_size)]
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.policy.train()
    tokens, start = 0, 0.0
    for step in range(steps + 1):
        batch = batches[step % len(batches)]
        if step == 1:  # the first step warms the allocator and kernels
            start, tokens = time.perf_counter(), 0
        loss = tag_loss(module(batch), batch["targets"], batch["train_mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {"tokens_per_sec": tokens / seconds, "seconds": seconds, "tokens": tokens}


def time_scoring(verifier: Path, rows: Sequence[dict[str, Any]], batch_size: int) -> dict[str, float]:
    """Scoring every row once with the verifier, and one LM forward over the same ids."""
    module = load_verifier(verifier)
    prompts, steps = [r["prompt"] for r in rows], [r["completions"] for r in rows]
    module.score(prompts[:batch_size], steps[:batch_size], batch_size)  # warm-up
    start = time.perf_counter()
    module.score(prompts, steps, batch_size)
    scoring = time.perf_counter() - start
    texts = [p + "\n".join(s) for p, s in zip(prompts, steps)]
    tokenizer = module.tokenizer
    ids = [tokenizer(t)["input_ids"] for t in texts]
    tokens = sum(len(x) for x in ids)
    start = time.perf_counter()
    with torch.no_grad():
        for j in range(0, len(ids), batch_size):
            chunk = ids[j:j + batch_size]
            width = max(len(x) for x in chunk)
            batch = torch.tensor([x + [0] * (width - len(x)) for x in chunk])
            module.policy(input_ids=batch, attention_mask=torch.ones_like(batch), use_cache=False)
    forward = time.perf_counter() - start
    return {"ms_per_rationale": 1000 * scoring / len(rows), "scoring_tokens_per_sec": tokens / scoring,
            "lm_forward_ms_per_rationale": 1000 * forward / len(rows), "rationales": len(rows)}


def run_share(run: Path) -> dict[str, Any]:
    """Seconds of the process-reward units of a finished run against the whole run (outer units only)."""
    outer = own_seconds(json.loads((run / "state.json").read_text())["units"])
    added = {u: s for u, s in outer.items() if u.rsplit("/", 1)[-1] in ("prm", "verifier", "outcome_verifier",
                                                                       "selection")}
    return {"run": str(run), "total_seconds": sum(outer.values()), "verifier_seconds": sum(added.values()),
            "share": sum(added.values()) / max(sum(outer.values()), 1e-9), "units": added}


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--run", type=Path, help="a finished quickstart-verifier run directory")
    parser.add_argument("--rows", type=int, default=512, help="prm rows to train on and score")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parse_args(parser, argv, {"rows": 16, "steps": 2, "batch_size": 8, "repeats": 1})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.run is not None and not args.smoke:
            policy = args.run / "round_1/rft/policy"
            rows = read_jsonl(args.run / "round_1/prm.jsonl")[: args.rows]
        else:
            policy = build_arith_model(work / "policy", "test", TASK_OPTIONS)
            rows = toy_rows(args.rows)
        rows_path = work / "rows.jsonl"
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        base = prepare_verifier_base(policy, work / "base")
        results = alternated({"train": lambda _: time_training(base, rows_path, args.steps, args.batch_size),
                              "score": lambda _: time_scoring(base, rows, args.batch_size)}, args.repeats)
        emit(bench="verifier_training", policy=str(policy), rows=len(rows), steps=args.steps,
             batch_size=args.batch_size, repeats=args.repeats,
             tokens_per_sec=median(r["tokens_per_sec"] for r in results["train"]))
        emit(bench="verifier_scoring", rationales=len(rows), batch_size=args.batch_size, repeats=args.repeats,
             **{k: median(r[k] for r in results["score"]) for k in
                ("ms_per_rationale", "scoring_tokens_per_sec", "lm_forward_ms_per_rationale")})
    if args.run is not None:
        emit(bench="verifier_share_of_run", **run_share(args.run))


if __name__ == "__main__":
    main()
