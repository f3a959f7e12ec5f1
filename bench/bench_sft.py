"""Bench: SFT training throughput (real tokens/s) and model FLOPs utilisation on the quickstart model.

Question: how fast does the quickstart SFT step run on this CPU, and how far is it from the
CPU's fp32 peak? The model shape, task knobs, batch size, max_length and optimizer come from
`configs/quickstart/sft.yaml` (or `--config`). The bench builds that tiny Llama (tokenizer
trained on the train split, as `selfexplore fit` does), takes `--steps` real training batches
from `SFTDataModule` (length-grouped, right-padded, the same ones every repeat), and times the
raw step: forward + backward + gradient clipping + AdamW step, with no Lightning overhead.
It runs `--warmup` steps first, then `--repeats` timed passes over the same batches and
reports the median.

Definitions (every number is printed):
- tokens_per_sec: real (non-pad, prompt + response) tokens / wall seconds of the full step.
  forward_tokens_per_sec is the same count over the forward pass alone; tokens_per_cpu_sec
  divides by the process CPU time instead (all threads summed), a load-robust companion.
- achieved FLOPs/s, two ways:
  `6N`:      6 * params * tokens/s (2 forward + 4 backward FLOPs per parameter per token;
             params counts the tied embedding once, which is the LM-head matmul; the
             embedding lookup itself is free), and
  `6N+attn`: adds 12 * layers * hidden * seq per token for the attention score and value
             matmuls (forward + backward), with seq = mean real sequence length.
  Padding positions are computed but not counted: this is useful-work MFU.
- peak FLOPs/s (fp32) = threads used x clock x FLOPs/cycle/core. The clock is lscpu's
  "CPU max MHz" when it reports one, else /proc/cpuinfo's "cpu MHz". FLOPs/cycle for fp32 is
  2 FMA units x (vector bits / 32) lanes x 2 (multiply + add): 32 with AVX2+FMA (256-bit),
  64 with AVX-512; override with `--flops-per-cycle` for CPUs with one FMA unit.
- mfu = achieved / peak.

The machine load (1-minute load average) is printed before and after: on shared cores the
numbers are lower bounds of what a quiet machine gives.

    OMP_NUM_THREADS=2 python bench/bench_sft.py          # about 1-2 minutes on 2 quiet cores
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from _harness import bench_parser, emit, median, parse_args

from selfexplore.data.sft import SFTDataModule
from selfexplore.models import ModelSpec, TinyLlamaConfig, build_tiny_llama, load_model

ROOT = Path(__file__).resolve().parents[1]


def cpu_peak(threads: int, flops_per_cycle: int | None) -> dict[str, Any]:
    """fp32 peak FLOPs/s of `threads` cores, with the inputs it was computed from."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    max_mhz = re.search(r"^CPU max MHz:\s*([\d.]+)", lscpu, re.M)
    cur_mhz = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    mhz, clock_source = ((float(max_mhz.group(1)), "lscpu CPU max MHz") if max_mhz else
                         (float(cur_mhz.group(1)), "/proc/cpuinfo cpu MHz") if cur_mhz else (0.0, "unknown"))
    flags_match = re.search(r"^Flags:\s*(.*)$", lscpu, re.M) or re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    flags = set(flags_match.group(1).split()) if flags_match else set()
    model = re.search(r"^Model name:\s*(.*)$", lscpu, re.M)
    if flops_per_cycle is None:
        flops_per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    cores = os.cpu_count() or 1
    return {"peak_flops": threads * mhz * 1e6 * flops_per_cycle, "threads": threads, "cores": cores,
            "clock_mhz": mhz, "clock_source": clock_source, "flops_per_cycle_per_core": flops_per_cycle,
            "cpu": model.group(1).strip() if model else "unknown",
            "isa": "avx512" if "avx512f" in flags else "avx2+fma" if {"avx2", "fma"} <= flags else "other"}


def load_quickstart(config_path: Path) -> tuple[TinyLlamaConfig, dict[str, Any], dict[str, Any], float]:
    """(model shape, SFTDataModule kwargs, optimizer kwargs, gradient clip) from the quickstart YAML."""
    config = yaml.safe_load(config_path.read_text())
    model_args = config["model"]["init_args"]
    data_args = dict(config["data"]["init_args"])
    optimizer = model_args.get("optimizer") or {}
    opt = {"lr": float(optimizer.get("lr", 1e-3)), "weight_decay": float(optimizer.get("weight_decay", 0.0))}
    clip = float(config.get("trainer", {}).get("gradient_clip_val") or 0.0)
    return TinyLlamaConfig(**model_args["from_scratch"]), data_args, opt, clip


def fixed_batches(data: SFTDataModule, count: int) -> list[dict[str, torch.Tensor]]:
    """The first `count` training batches of the datamodule (cycling if it has fewer)."""
    batches: list[dict[str, torch.Tensor]] = []
    while len(batches) < count:
        for batch in data.train_dataloader():
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def step_times(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[dict[str, torch.Tensor]],
               clip: float) -> tuple[float, float, float]:
    """(wall seconds, forward-only wall seconds, process CPU seconds) of one training step per batch."""
    total = forward = 0.0
    cpu_start = time.process_time()
    for batch in batches:
        start = time.perf_counter()
        loss = model(**batch).loss
        forward += time.perf_counter() - start
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total += time.perf_counter() - start
    return total, forward, time.process_time() - cpu_start


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart" / "sft.yaml")
    parser.add_argument("--model-dir", type=Path, help="reuse/build the base model here (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, help="override the config's batch size")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--flops-per-cycle", type=int, help="fp32 FLOPs/cycle/core (default from CPU flags)")
    args = parse_args(parser, argv, smoke={"steps": 2, "warmup": 1, "repeats": 1})
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    shape, data_args, opt, clip = load_quickstart(args.config)
    if args.batch_size:
        data_args["batch_size"] = args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        data = SFTDataModule(**{**data_args, "tokenizer_path": str(model_dir)})
        if not model_dir.exists():
            build_tiny_llama(data.corpus_texts(), model_dir, shape)
        data.setup("fit")
        model = load_model(ModelSpec(path=str(model_dir)), for_training=True)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=opt["lr"], weight_decay=opt["weight_decay"])
        batches = fixed_batches(data, args.warmup + args.steps)
        warm, timed = batches[:args.warmup], batches[args.warmup:]
        load_before = os.getloadavg()[0]
        step_times(model, optimizer, warm, clip)
        runs = [step_times(model, optimizer, timed, clip) for _ in range(args.repeats)]
        load_after = os.getloadavg()[0]

    params = sum(p.numel() for p in model.parameters())
    lengths = [int(n) for b in timed for n in b["attention_mask"].sum(dim=1)]
    tokens = sum(lengths)
    padded = sum(b["attention_mask"].numel() for b in timed)
    mean_seq = tokens / len(lengths)
    seconds = median(t for t, _, _ in runs)
    forward_seconds = median(f for _, f, _ in runs)
    cpu_seconds = median(c for _, _, c in runs)
    tokens_per_sec = tokens / seconds
    flops_6n = 6 * params * tokens_per_sec
    attn_per_token = 12 * shape.num_layers * shape.hidden_size * mean_seq
    flops_attn = flops_6n + attn_per_token * tokens_per_sec
    peak = cpu_peak(args.threads, args.flops_per_cycle)
    emit(bench="sft_throughput", tokens_per_sec=round(tokens_per_sec, 1),
         forward_tokens_per_sec=round(tokens / forward_seconds, 1),
         tokens_per_cpu_sec=round(tokens / cpu_seconds, 1),
         steps_per_sec=round(args.steps / seconds, 3), params=params,
         achieved_flops_6n=round(flops_6n), achieved_flops_6n_attn=round(flops_attn),
         peak_flops=round(peak["peak_flops"]),
         mfu=round(flops_6n / peak["peak_flops"], 5) if peak["peak_flops"] else None,
         mfu_with_attn=round(flops_attn / peak["peak_flops"], 5) if peak["peak_flops"] else None,
         **{k: v for k, v in peak.items() if k != "peak_flops"},
         steps=args.steps, warmup=args.warmup, repeats=args.repeats,
         repeat_seconds=[round(t, 3) for t, _, _ in runs], batch_size=data_args.get("batch_size"),
         real_tokens_per_repeat=tokens, padded_tokens_per_repeat=padded, mean_seq_len=round(mean_seq, 1),
         hidden=shape.hidden_size, layers=shape.num_layers, load_avg_before=load_before,
         load_avg_after=load_after)


if __name__ == "__main__":
    main()
