"""Bench: host memory of DPO log-probs and of FSDP2 step-DPO, before/after issue 19, on CPU.

    python bench/bench_memory.py                       # both parts, 3 alternated repeats each
    python bench/bench_memory.py --skip-fsdp           # log-prob part only (a minute)
    python bench/bench_memory.py --skip-logps --model-size 205m   # fsdp part on a 205M Llama
    python bench/bench_memory.py --smoke               # seconds: tiny shapes, 1 repeat, no 'before' tree

1. logps: peak RSS increase of forward + backward of the DPO sequence log-probs over bf16
   logits [rows, length, vocab], in a fresh subprocess per measurement: "full" is the former
   `sequence_logps` (an fp32 copy of the shifted logits + logsumexp, kept for the backward),
   "selective" is `selfexplore.training.losses.sequence_logps` now. Shapes: the tiny model's
   DPO batch (8 pairs x 96 tokens x 300) and a realistic one (2 rows x 1024 x 102400, MATH
   with DeepSeek-Math's vocabulary; 16 rows in a real batch scale it 8x).
2. fsdp: tests/fsdp_dpo_worker.py (2 gloo processes, FSDP2, reference = the start weights,
   2 steps, export) on a random-init Llama (`--model-size`: 42m, 168 MB fp32, or 205m, 820 MB,
   where the weights and their states outweigh the ~400 MiB of imports), run from this tree
   ("after") and from a git worktree of `--before` (default 97e304b, the commit before issue
   19; empty: this tree only), order alternated. Per rank: the peak RSS (high-water mark) after loading + sharding,
   after the reference pass, after the steps and of the whole fit (after the export), and the
   reference table's max difference to a 1-process precompute of the same data.
   glibc's malloc keeps much of what the fit frees (its mmap threshold grows to the largest
   freed block, up to 32 MiB, after which such blocks come from the heap and stay there); the
   environment is passed on, so `MALLOC_MMAP_THRESHOLD_=1048576` measures without that.
One JSON line per figure; medians over the repeats.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _harness import alternated, bench_parser, build_arith_model, emit, median, parse_args, run_worker, serve_worker

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"tiny": (16, 96, 300), "realistic": (2, 1024, 102400)}
MODEL_SIZES = ("42m", "205m", "test")  # --model-size: shapes of selfexplore.models.tiny.TINY_SHAPES
PHASES = ("load_peak_rss_mib", "reference_peak_rss_mib", "train_peak_rss_mib", "peak_rss_mib")


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS now, VmHWM the peak since the last reset) in MiB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def reset_peak_rss() -> None:
    """Linux: restart VmHWM from the current RSS, so the peak excludes building the inputs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def logps_worker(method: str, shape: str, mode: str) -> dict[str, float]:
    """Print the peak RSS increase (MiB) of `method`'s log-probs: a no-grad forward (the reference
    pass) or a forward + backward (a training step; includes the logits' bf16 gradient)."""
    import torch

    from selfexplore.training.losses import sequence_logps

    torch.set_num_threads(1)
    rows, length, vocab = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, length, vocab, generator=g).to(torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.zeros(rows, length, dtype=torch.bool)
    mask[:, length // 3:] = True  # the response: the last two thirds

    def full(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # before issue 19
        shifted = logits[:, :-1].float()
        m = mask[:, 1:]
        targets = torch.where(m, labels[:, 1:], torch.zeros_like(labels[:, 1:]))
        token = shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(shifted, dim=-1)
        return (token * m).sum(-1)

    fn = full if method == "full" else sequence_logps
    small = logits.detach()[:1, :8].clone().requires_grad_(True)
    fn(small, labels[:1, :8], mask[:1, :8]).sum().backward()  # warm up kernels outside the measurement
    reset_peak_rss()
    before = status_mib("VmRSS")
    if mode == "forward":
        with torch.no_grad():
            fn(logits, labels, mask)
    else:
        fn(logits, labels, mask).sum().backward()
    return {"peak_increase_mib": status_mib("VmHWM") - before}


def run_logps(repeats: int, shapes: Sequence[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for shape, mode in ((shape, mode) for shape in shapes for mode in ("forward", "forward_backward")):
        def measure(method: str) -> float:
            payload = {"method": method, "shape": shape, "mode": mode}
            return run_worker(__file__, "logps", payload, env=env)["peak_increase_mib"]

        results = alternated({m: (lambda r, m=m: measure(m)) for m in ("full", "selective")}, repeats)
        full, selective = (median(results[m]) for m in ("full", "selective"))
        rows, length, vocab = SHAPES[shape]
        emit(bench="logps_peak_memory", shape=shape, mode=mode, rows=rows, length=length, vocab=vocab,
             bf16_logits_mib=round(rows * length * vocab * 2 / 2**20, 1), full_mib=round(full, 1),
             selective_mib=round(selective, 1), ratio=round(selective / full, 3) if full > 0 else None,
             repeats=repeats, samples=results)


def prepare_fsdp(work: Path, size: str) -> tuple[Path, Path]:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_dpo import _pairs

    task = {"train_size": 400, "validation_size": 50, "test_size": 50}
    return build_arith_model(work / "model", size, task), _pairs(work / "pairs.jsonl", n=16)


def one_process_table(model: Path, pairs: Path, work: Path):
    from lightning.pytorch import Trainer

    from selfexplore.data.preference import PreferenceDataModule
    from selfexplore.models import ModelSpec
    from selfexplore.training.dpo import StepDPOModule

    module = StepDPOModule(ModelSpec(path=str(model)), reference_cache_dir=str(work / "single_cache"))
    module.configure_model()
    data = PreferenceDataModule(train_path=str(pairs), max_length=96, max_prompt_length=64, batch_size=4,
                                tokenizer_path=str(model))
    data.setup("fit")
    module.trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             default_root_dir=str(work))
    return module.precompute_reference(data.train_dataset, data)


def run_fsdp(repeats: int, before: str, work: Path, size: str) -> None:
    import torch
    from safetensors import safe_open

    model, pairs = prepare_fsdp(work, size)
    params = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    malloc_env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    single = one_process_table(model, pairs, work)
    trees = {"after": ROOT}
    if before:
        trees["before"] = work / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(trees["before"]), before],
                       check=True, capture_output=True)

    def fit(name: str, repeat: int) -> dict:
        out = work / f"{name}_{repeat}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(trees[name])}
        subprocess.run([sys.executable, str(ROOT / "tests" / "fsdp_dpo_worker.py"), str(model), str(pairs),
                        str(out), "--steps", "2", "--batch-size", "4"], check=True, capture_output=True,
                       cwd=trees[name], env=env)
        ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
        [cached] = (out / "reference_cache").glob("*.pt")
        return {"ranks": ranks, "table_max_abs_diff_vs_1_process": float((torch.load(cached) - single).abs().max())}

    try:
        results = alternated({name: (lambda r, name=name: fit(name, r)) for name in reversed(trees)}, repeats)
        for key in PHASES:
            for rank in (0, 1):
                values = {n: median(run["ranks"][rank].get(key, float("nan")) for run in results[n]) for n in results}
                ratio = round(values["after"] / values["before"], 3) if "before" in values else None
                emit(bench="fsdp2_dpo_rss", figure=key, rank=rank, ratio=ratio,
                     **{f"{n}_mib": round(v, 1) for n, v in values.items()},
                     model_size=size, model_params_m=round(params / 1e6, 1), malloc_env=malloc_env, repeats=repeats,
                     samples={n: [run["ranks"][rank].get(key) for run in results[n]] for n in results})
        for name in results:
            emit(bench="fsdp2_reference_table", tree=name, max_abs_diff_vs_1_process=max(
                run["table_max_abs_diff_vs_1_process"] for run in results[name]),
                checkpoint_reads_per_rank=[results[name][0]["ranks"][k]["from_pretrained"] for k in (0, 1)])
    finally:
        if "before" in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(trees["before"])],
                           check=False)


def main(argv: Sequence[str] | None = None) -> None:
    if serve_worker({"logps": logps_worker}, argv):
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--before", default="97e304b", help="the commit measured as 'before' ('': none)")
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="42m", help="the fsdp part's Llama")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="the logps part's logits shapes")
    parser.add_argument("--skip-fsdp", action="store_true")
    parser.add_argument("--skip-logps", action="store_true")
    args = parse_args(parser, argv, smoke={"repeats": 1, "before": "", "model_size": "test", "shapes": "tiny"})
    if not args.skip_logps:
        run_logps(args.repeats, args.shapes.split(","))
    if not args.skip_fsdp:
        with tempfile.TemporaryDirectory() as work:
            run_fsdp(args.repeats, args.before, Path(work), args.model_size)


if __name__ == "__main__":
    main()
