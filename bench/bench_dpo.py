"""Bench: step-DPO training throughput and loss agreement, ours vs TRL's DPOTrainer.

Question: is `StepDPOModule` + `PreferenceDataModule` (reference="precomputed", the default)
at least 1.5x faster than TRL's `DPOTrainer` on the same work, and do the two compute the same
loss? Needs TRL, which must not go into the main venv (it may move transformers):

    python3 -m venv .venv-trl && .venv-trl/bin/pip install -e . trl
    .venv-trl/bin/python bench/bench_dpo.py            # a few minutes on 2 shared cores

Setup (identical for both implementations):
- A tiny Llama built with `build_tiny_llama` on `arith` texts (+/-, operands <= 9, values <= 30).
- Step-level pairs from that task: prompt = question + the first k solution lines + "\\n";
  chosen = the correct remaining lines; rejected = the same lines with an arithmetic slip in
  the first remaining equation, carried forward to a wrong final answer.
- Same weights (loaded by `selfexplore.models.load_model`), batch size, max_length, sigmoid
  loss with beta 0.1, AdamW (torch), linear decay over the same `max_steps`, grad-norm clip
  1.0, fp32, `--threads` intra-op threads. Reference log-probs precomputed before training in
  both (ours: `reference="precomputed"`; TRL: `precompute_ref_log_probs=True`); the
  precompute is not part of the timed windows.

Definitions:
- tokens_per_sec: real (non-pad) tokens of the [2B, L] chosen+rejected forward, i.e. 2x
  prompt + chosen + rejected (+EOS), summed over the N steps of a window, divided by the wall
  time of that window measured end-of-step to end-of-step inside the framework's own training
  loop (data loading, logging and the optimizer step included). The median over `--repeats`
  consecutive windows after `--warmup` steps is reported. Each implementation iterates its
  own sampler (ours: the length-grouped default; TRL: random), so padded tokens differ and are
  printed; real-token throughput is what is compared.
- peak_rss_mb: `ru_maxrss` of a fresh subprocess per configuration (imports + model + data +
  precompute + training); baseline_rss_mb is the RSS after imports, before anything else.
- dpo_loss: both implementations' mean loss over every pair of the file, policy = the base
  model with seeded Gaussian noise added to every weight, reference = the base model (so the
  loss is not trivially log 2). Ours: `Trainer.validate` of `StepDPOModule` on the pairs (its
  reference table precomputed as in training). TRL: `DPOTrainer(ref_model=base,
  precompute_ref_log_probs=True)`, its collator on its own tokenization of the same pairs, then
  `compute_loss` per batch. TRL tokenizes prompt+completion as one text (EOS appended as text)
  and splits at the common prefix; ours tokenizes the prompt and each completion separately.
  The bench checks that the token ids agree for every pair and prints the number of
  mismatching pairs (0 expected: prompts end with a newline, which our digit-splitting
  byte-level BPE never merges with the next token).

Without TRL installed, only our side runs (and a `skipped` line says so); `--smoke` runs that
in seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import bench_parser, build_arith_model, emit, median, parse_args, run_worker, serve_worker

SHAPE = "small"  # selfexplore.models.tiny.TINY_SHAPES
TASK_OPTIONS = {"min_steps": 2, "max_steps": 4, "operations": ["+", "-"], "max_operand": 9, "max_value": 30}
EQUATION = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)$")


# ----- data and models (parent process) ---------------------------------------------------
def slipped(lines: list[str], rng: random.Random) -> list[str] | None:
    """`lines` with an off-by-d slip in the first equation, carried forward; None if impossible."""
    out: list[str] = []
    value: int | None = None
    for line in lines:
        m = EQUATION.match(line)
        if m is None:
            out.append(f"The answer is {value}" if value is not None and line.startswith("The answer is") else line)
            continue
        a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
        if value is None:
            right = a + b if op == "+" else a - b
            value = right + rng.choice([d for d in (-3, -2, -1, 1, 2, 3) if right + d > 0])
            out.append(f"{a} {op} {b} = {value}")
        else:
            a = value
            value = a + b if op == "+" else a - b
            out.append(f"{a} {op} {b} = {value}")
    return out if value is not None and out != lines else None


def build_pairs(problems: list[Any], prompt_of: Any, fits: Any, count: int, seed: int) -> list[dict[str, str]]:
    """Step-level-looking pairs: split each gold solution after k of its lines (k >= 1).

    Pairs for which `fits(pair)` is false (they would be truncated) are left out, because the
    two implementations truncate differently and the bench compares them on the same tokens.
    """
    rng = random.Random(seed)
    pairs: list[dict[str, str]] = []
    for problem in problems:
        lines = [line for line in problem.solution.splitlines() if line.strip()]
        equations = [i for i, line in enumerate(lines) if EQUATION.match(line)]
        if not equations:
            continue
        k = rng.choice([i for i in range(1, equations[-1] + 1)])
        rest = lines[k:]
        rejected = slipped(rest, rng)
        if rejected is None:
            continue
        prompt = prompt_of(problem) + "".join(line + "\n" for line in lines[:k])
        pair = {"prompt": prompt, "chosen": "\n".join(rest), "rejected": "\n".join(rejected)}
        if fits(pair):
            pairs.append(pair)
        if len(pairs) == count:
            return pairs
    raise ValueError(f"only {len(pairs)} pairs could be built, wanted {count}")


def prepare(work: Path, num_pairs: int, max_length: int, max_prompt_length: int, seed: int) -> dict[str, Any]:
    """Base model, perturbed policy (for the loss check) and pairs JSONL under `work`."""
    import torch

    from selfexplore.io import write_jsonl
    from selfexplore.models import ModelSpec, load_model, load_tokenizer
    from selfexplore.tasks import get_task

    task = get_task("arith", **TASK_OPTIONS)
    problems = task.load("train")
    base = build_arith_model(work / "base", SHAPE, TASK_OPTIONS)
    tokenizer = load_tokenizer(base)
    dropped = 0

    def fits(pair: dict[str, str]) -> bool:  # BOS + prompt, completion + EOS, no truncation anywhere
        nonlocal dropped
        prompt = len(tokenizer(pair["prompt"]).input_ids)
        longest = max(len(tokenizer(pair[k], add_special_tokens=False).input_ids) for k in ("chosen", "rejected"))
        ok = prompt <= max_prompt_length and prompt + longest + 1 <= max_length
        dropped += not ok
        return ok

    pairs = build_pairs(problems, task.prompt, fits, num_pairs, seed)
    write_jsonl(work / "pairs.jsonl", pairs)

    policy_dir = work / "policy"
    shutil.copytree(base, policy_dir)
    model = load_model(ModelSpec(path=str(base)), for_training=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(policy_dir)
    return {"pairs": len(pairs), "dropped_would_truncate": dropped, "train_problems": len(problems),
            "example_pair": pairs[0]}


# ----- workers (fresh subprocess each) ------------------------------------------------------
def window_stats(ends: list[float], tokens: list[int], padded: list[int], warmup: int, steps: int,
                 repeats: int) -> dict[str, Any]:
    """Median real tokens/s over `repeats` windows of `steps` steps after `warmup` steps.

    `ends[i]` is the wall time at the end of step i+1; `tokens`/`padded` are per step.
    """
    need = warmup + steps * repeats
    if len(ends) < need or len(tokens) < need:
        raise RuntimeError(f"recorded {len(ends)} step ends and {len(tokens)} batches, need {need}")
    rates, seconds, real = [], [], []
    for r in range(repeats):
        lo, hi = warmup + r * steps, warmup + (r + 1) * steps  # steps lo+1 .. hi
        dt = ends[hi - 1] - ends[lo - 1]
        n = sum(tokens[lo:hi])
        rates.append(n / dt)
        seconds.append(round(dt, 3))
        real.append(n)
    timed = slice(warmup, need)
    return {"tokens_per_sec": round(median(rates), 1),
            "repeat_tokens_per_sec": [round(x, 1) for x in rates], "repeat_seconds": seconds,
            "real_tokens_per_repeat": real,
            "pad_fraction": round(1 - sum(tokens[timed]) / sum(padded[timed]), 4)}


def run_selfexplore(args: argparse.Namespace, work: Path, root: Path) -> dict[str, Any]:
    import torch
    from lightning.pytorch import Callback, Trainer

    from selfexplore.data.preference import PreferenceDataModule
    from selfexplore.models import ModelSpec
    from selfexplore.training.dpo import StepDPOModule
    from selfexplore.training.losses import DPOLossConfig
    from selfexplore.training.optim import OptimizerConfig, SchedulerConfig

    class Timer(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.tokens: list[int] = []
            self.padded: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.ends.append(time.perf_counter())
            self.tokens.append(int(batch["attention_mask"].sum()))
            self.padded.append(batch["attention_mask"].numel())

    torch.manual_seed(args.seed)
    data = PreferenceDataModule(str(work / "pairs.jsonl"), tokenizer_path=str(work / "base"),
                                max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                batch_size=args.batch_size, seed=args.seed, length_grouped=not args.ungrouped)
    module = StepDPOModule(ModelSpec(path=str(work / "base")), loss=DPOLossConfig(beta=args.beta),
                           reference="precomputed",
                           optimizer=OptimizerConfig(name="adamw", lr=args.lr),
                           scheduler=SchedulerConfig(name="linear"))
    timer = Timer()
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", max_steps=args.max_steps,
                      gradient_clip_val=1.0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=str(root), callbacks=[timer])
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - start
    stats = window_stats(timer.ends, timer.tokens, timer.padded, args.warmup, args.steps, args.repeats)
    return {**stats, "fit_seconds": round(fit_seconds, 2), "data_stats": data.stats["train"],
            "length_grouped": not args.ungrouped}


def make_trl_trainer(args: argparse.Namespace, work: Path, root: Path, policy: str, ref: str | None,
                     num_pairs: int | None = None):
    """A TRL DPOTrainer on the bench's pairs with the shared settings (counts tokens per step)."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    from selfexplore.io import read_jsonl
    from selfexplore.models import ModelSpec, load_model, load_tokenizer

    class CountingDPOTrainer(DPOTrainer):
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            self.bench_tokens: list[int] = []
            self.bench_padded: list[int] = []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.bench_tokens.append(int(inputs["attention_mask"].sum()))
                self.bench_padded.append(inputs["attention_mask"].numel())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(work / "pairs.jsonl")]
    dataset = datasets.Dataset.from_list(records[:num_pairs] if num_pairs else records)
    config = DPOConfig(output_dir=str(root / "trl"), per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=0, max_steps=args.max_steps,
                       beta=args.beta, loss_type=["sigmoid"], max_length=args.max_length,
                       precompute_ref_log_probs=True, report_to="none", save_strategy="no", logging_steps=10_000,
                       disable_tqdm=True, optim="adamw_torch", max_grad_norm=1.0, weight_decay=0.0,
                       dataloader_pin_memory=False, seed=args.seed, use_cpu=True, bf16=False, fp16=False)
    model = load_model(ModelSpec(path=policy), for_training=True)
    ref_model = load_model(ModelSpec(path=ref), for_training=False) if ref else None
    return CountingDPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                              processing_class=load_tokenizer(policy))


def run_trl(args: argparse.Namespace, work: Path, root: Path) -> dict[str, Any]:
    import trl
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, targs, state, control, **kwargs) -> None:
            self.ends.append(time.perf_counter())

    start = time.perf_counter()
    trainer = make_trl_trainer(args, work, root, str(work / "base"), None)  # precomputes the reference here
    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    fit_seconds = time.perf_counter() - start
    stats = window_stats(timer.ends, trainer.bench_tokens, trainer.bench_padded, args.warmup, args.steps,
                         args.repeats)
    return {**stats, "fit_seconds": round(fit_seconds, 2), "trl_version": trl.__version__}


def run_loss(args: argparse.Namespace, work: Path, root: Path) -> dict[str, Any]:
    """Mean loss over all pairs of both implementations (policy = perturbed base, reference = base)."""
    import torch
    from lightning.pytorch import Trainer

    from selfexplore.data.preference import PreferenceDataModule
    from selfexplore.models import ModelSpec
    from selfexplore.training.dpo import StepDPOModule
    from selfexplore.training.losses import DPOLossConfig

    pairs = str(work / "pairs.jsonl")
    data = PreferenceDataModule(pairs, val_path=pairs, tokenizer_path=str(work / "base"), max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length, batch_size=args.batch_size)
    module = StepDPOModule(ModelSpec(path=str(work / "policy")), loss=DPOLossConfig(beta=args.beta),
                           reference="precomputed", reference_path=str(work / "base"),
                           reference_cache_dir=str(root / "reference_cache"))
    trainer = Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(root))
    [metrics] = trainer.validate(module, datamodule=data, verbose=False)
    ours = float(metrics["val/loss"])
    examples = data.val_dataset.examples
    result: dict[str, Any] = {"selfexplore": ours, "pairs_compared": len(examples)}
    if importlib.util.find_spec("trl") is None:
        return {**result, "trl": None}
    import trl

    trl_trainer = make_trl_trainer(args, work, root, str(work / "policy"), str(work / "base"))
    rows = [trl_trainer.train_dataset[i] for i in range(len(trl_trainer.train_dataset))]
    mismatched = sum((row["prompt_ids"], row["chosen_ids"], row["rejected_ids"])
                     != (e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for row, e in zip(rows, examples))
    mismatched += abs(len(rows) - len(examples))
    trl_trainer.model.train()
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), args.batch_size):
            batch = rows[start:start + args.batch_size]
            total += len(batch) * float(trl_trainer.compute_loss(trl_trainer.model, trl_trainer.data_collator(batch)))
    theirs = total / len(rows)
    table = module.reference_tables["val"][1]
    trl_table = torch.tensor([[r["ref_chosen_logps"], r["ref_rejected_logps"]] for r in rows])
    ref_diff = float((trl_table - table).abs().max())
    return {**result, "trl": theirs, "abs_diff": abs(ours - theirs), "tolerance": 1e-4,
            "agree": abs(ours - theirs) <= 1e-4, "tokenization_mismatched_pairs": mismatched,
            "max_abs_diff_ref_logps_all_pairs": ref_diff, "trl_version": trl.__version__}


def worker(impl: str, **options: Any) -> dict[str, Any]:
    """One implementation's measurement in this (fresh) process, with its peak RSS."""
    import psutil

    baseline = psutil.Process().memory_info().rss / 2**20
    import torch

    args = argparse.Namespace(**options)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    root = Path(tempfile.mkdtemp(prefix=f"{impl}-", dir=work))
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_datasets")
    run = {"selfexplore": run_selfexplore, "trl": run_trl, "loss": run_loss}[impl]
    result = run(args, work, root)
    return {**result, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "baseline_rss_mb": round(baseline, 1)}


# ----- parent ------------------------------------------------------------------------------
def spawn(args: argparse.Namespace, work: Path, impl: str, ungrouped: bool = False) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    options = {k: v for k, v in vars(args).items() if k not in ("smoke", "skip_throughput", "with_ungrouped")}
    return run_worker(__file__, "run", {**options, "impl": impl, "work": str(work), "ungrouped": ungrouped}, env=env)


def main(argv: Sequence[str] | None = None) -> None:
    if serve_worker({"run": worker}, argv):
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per timed window")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (OMP_NUM_THREADS), both impls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1, help="ours/TRL subprocess pairs, order alternated")
    parser.add_argument("--with-ungrouped", action="store_true",
                        help="also run ours with a plain shuffle (TRL's sampling) instead of length grouping")
    parser.add_argument("--skip-throughput", action="store_true", help="only the loss agreement check")
    args = parse_args(parser, argv, smoke={"pairs": 16, "batch_size": 4, "warmup": 1, "steps": 1, "repeats": 1})
    args.max_steps = args.warmup + args.steps * args.repeats  # the timed windows: --repeats of them
    if args.max_steps * args.batch_size > args.pairs:
        parser.error(f"warmup + steps * repeats = {args.max_steps} batches need more than {args.pairs} pairs "
                     "(keep the run inside one epoch)")
    have_trl = importlib.util.find_spec("trl") is not None
    if not have_trl:
        emit(bench="dpo", skipped="trl", reason="trl is not installed: only our side runs (see the docstring)")
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        work = Path(tmp)
        setup = prepare(work, args.pairs, args.max_length, args.max_prompt_length, args.seed)
        emit(bench="dpo_setup", **setup, model_shape=SHAPE, task_options=TASK_OPTIONS,
             batch_size=args.batch_size, max_length=args.max_length, beta=args.beta, lr=args.lr,
             threads=args.threads, warmup=args.warmup, steps=args.steps, repeats=args.repeats,
             load_avg=os.getloadavg()[0])

        loss = spawn(args, work, "loss")
        emit(bench="dpo_loss", **{k: v for k, v in loss.items() if k not in ("peak_rss_mb", "baseline_rss_mb")})
        if args.skip_throughput:
            return
        impls = ["selfexplore", "trl"] if have_trl else ["selfexplore"]
        results: dict[str, list[dict[str, Any]]] = {"selfexplore": [], "trl": [], "selfexplore_ungrouped": []}
        for r in range(args.rounds):
            for name in (impls if r % 2 == 0 else impls[::-1]):
                load = os.getloadavg()[0]
                out = spawn(args, work, name)
                results[name].append(out)
                emit(bench="dpo_throughput", impl=name, round=r, load_avg_before=load, **out)
            if args.with_ungrouped:
                load = os.getloadavg()[0]
                out = spawn(args, work, "selfexplore", ungrouped=True)
                results["selfexplore_ungrouped"].append(out)
                emit(bench="dpo_throughput", impl="selfexplore_ungrouped", round=r, load_avg_before=load, **out)
    if not have_trl:
        return
    ours = median(x["tokens_per_sec"] for x in results["selfexplore"])
    theirs = median(x["tokens_per_sec"] for x in results["trl"])
    extra = {}
    if results["selfexplore_ungrouped"]:
        extra["ratio_ungrouped"] = round(median(x["tokens_per_sec"] for x in results["selfexplore_ungrouped"])
                                         / theirs, 3)
    emit(bench="dpo_throughput_ratio", selfexplore_tokens_per_sec=ours, trl_tokens_per_sec=theirs,
         ratio=round(ours / theirs, 3), target=1.5, meets_target=ours / theirs >= 1.5, **extra,
         selfexplore_peak_rss_mb=max(x["peak_rss_mb"] for x in results["selfexplore"]),
         trl_peak_rss_mb=max(x["peak_rss_mb"] for x in results["trl"]),
         trl_version=results["trl"][0]["trl_version"], load_avg_after=os.getloadavg()[0])


if __name__ == "__main__":
    main()
