"""GPU check: what only CUDA can show, in one call: training throughput/MFU and memory per stage, the
free memory an engine finds after a fit, the recipes of configs/recipes/ as written, the miniature pipeline.

    python bench/gpu_check.py                 # one CUDA GPU, under 8 minutes
    python bench/gpu_check.py --smoke         # CPU (or GPU) in seconds: tiny sizes, recipes and pipeline skipped
    python bench/gpu_check.py --recipes gsm8k-mistral7b-dpo-fsdp   # only these recipes ('none': no recipe)

Needs only torch, transformers, peft, lightning, torchmetrics, sympy, tokenizers, safetensors and
matplotlib (no vLLM, no bitsandbytes, no pytest, no downloads): everything is built from scratch. One
JSON line per figure; a figure this machine cannot give is a line with "skipped" and the reason. On a
machine without CUDA (and without --smoke) every check is such a line, naming what it needs, in seconds.

- env: torch / CUDA versions, the GPU, its dense bf16 peak (for MFU; table below).
- sft, dpo: tokens/s (real tokens of the steps after the first, forward + backward + optimizer),
  MFU = 6 x parameters x tokens/s / bf16 peak, peak accelerator memory of the fit.
- sampling: HF generate tokens/s and its peak memory.
- free_before_engine: what `mem_get_info` reports when the pipeline starts an engine: the fit's module
  and trainer dropped, then `release_accelerator_memory()`; the memory torch still holds then, and the
  `gpu_memory_utilization: auto` value vLLM would get.
- recipe: each recipe kind of tests/test_recipes_as_written.py (sft|dpo x qlora|fsdp, Llama and Mistral
  families, both tasks; the QLoRA pipeline with vLLM sampling) on this GPU, as written in bf16 but for
  the model (a tiny one of the recipe model's family), the device count (1), the data and the sizes:
  the keys changed, the step-0 DPO loss against log 2, the export's architecture, seconds, peak
  memory. A recipe that needs a missing package (bitsandbytes for nf4 QLoRA, vllm for vLLM sampling)
  is a skipped line naming it. They run in one worker process (`--worker recipes`).
- pipeline: configs/quickstart.yaml's whole run (SFT, RFT, exploration, outcome DPO, 2 Self-Explore
  rounds) in bf16-mixed on the GPU, with the free memory before every engine start it makes.
- done: the seconds the whole check took.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"  # the recipe runs (recipe_configs, recipe_worker, real_tokenizers): no pytest needed
for _path in (ROOT, ROOT / "bench", TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from _harness import emit, serve_worker, spawn_worker, worker_result  # noqa: E402

from selfexplore.memory import (  # noqa: E402
    GIB,
    accelerator_memory,
    auto_memory_utilization,
    release_accelerator_memory,
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "B200": 2250.0}
CHECK_MODEL = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 1408,
               "vocab_size": 512, "max_position_embeddings": 256}
SMOKE_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128,
               "vocab_size": 300, "max_position_embeddings": 256}

NO_CUDA = ("needs a CUDA device (none here): run it on a GPU machine; --smoke gives the CPU figures, and "
           "the recipes run on CPU in tests/test_recipes_as_written.py")
# Checks that need a CUDA device (the recipe lines are added per recipe).
CUDA_CHECKS = ("sft_tokens_per_sec", "sft_mfu", "sft_peak_memory", "sampling_tokens_per_sec",
               "sampling_peak_memory", "dpo_tokens_per_sec", "dpo_mfu", "dpo_peak_memory", "free_before_engine")
# What each missing package rules out, and how to install it.
PACKAGES = {"bitsandbytes": "nf4 QLoRA: pip install 'bitsandbytes>=0.45' (a CUDA build)",
            "vllm": "vLLM sampling: pip install -e '.[vllm]'"}


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None when it is not in the table."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in device_name), None)


def mfu(params: int, tokens_per_sec: float, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation of training: 6 FLOPs per parameter per token (forward + backward)."""
    return None if not peak_tflops else 6 * params * tokens_per_sec / (peak_tflops * 1e12)


class StepTimer(Callback):
    """Real tokens and wall time of every training step after the first (kernel warm-up excluded)."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self._start = 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if batch_idx > 0:
            self.tokens += int(batch["attention_mask"].sum())
            self.seconds += time.perf_counter() - self._start


def stage_memory() -> dict[str, Any]:
    """Peak accelerator memory since the last reset (then reset), or why there is none."""
    if not torch.cuda.is_available():
        return {"peak_memory_gib": None, "skipped": "no CUDA device: peak accelerator memory is a GPU figure"}
    peak = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    return {"peak_memory_gib": round(peak, 3)}


def throughput_figures(stage: str, timer: StepTimer, params: int, peak: float | None) -> None:
    tps = timer.tokens / timer.seconds if timer.seconds else 0.0
    value = mfu(params, tps, peak)
    emit(figure=f"{stage}_tokens_per_sec", value=round(tps, 1), steps_timed_tokens=timer.tokens, params=params)
    emit(figure=f"{stage}_mfu", value=None if value is None else round(value, 4),
         **({} if value is not None else {"skipped": "no bf16 peak for this device (CPU, or a GPU not in the table)"}))
    emit(figure=f"{stage}_peak_memory", **stage_memory())


def free_before_engine(where: str) -> None:
    """What an engine started now would find: `get_sampler` releases first, then vLLM reads `mem_get_info`."""
    release_accelerator_memory()
    memory = accelerator_memory()
    if memory is None:
        emit(figure="free_before_engine", where=where, skipped="no CUDA device: vLLM's share is sized on GPUs only")
        return
    free, total = memory
    try:
        auto: float | str = auto_memory_utilization(free, total)
    except RuntimeError as error:
        auto = f"refused: {error}"
    emit(figure="free_before_engine", where=where, free_gib=round(free / GIB, 2), total_gib=round(total / GIB, 2),
         torch_allocated_gib=round(torch.cuda.memory_allocated() / GIB, 3),
         torch_reserved_gib=round(torch.cuda.memory_reserved() / GIB, 3), auto_gpu_memory_utilization=auto)


def pairs_file(task: Any, path: Path, count: int) -> Path:
    """Step-level pairs built from gold rationales: the right next line against a wrong one."""
    rows = []
    for p in task.load("train")[:count]:
        lines = p.solution.split("\n")
        wrong = lines[0].rsplit("= ", 1)[0] + f"= {p.answer}1"  # a slip in the first step
        rows.append({"prompt": task.prompt(p), "chosen": lines[0], "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def trainer(args: argparse.Namespace, work: Path, callbacks: list[Callback]) -> Trainer:
    return Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.steps,
                   logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(work), callbacks=callbacks)


def training_checks(args: argparse.Namespace, work: Path, peak: float | None) -> None:
    from selfexplore.data.preference import PreferenceDataModule
    from selfexplore.data.sft import SFTDataModule
    from selfexplore.models import ModelSpec, TinyLlamaConfig, build_tiny_llama
    from selfexplore.sampling.base import DrawParams
    from selfexplore.sampling.hf import HFSampler
    from selfexplore.tasks import get_task
    from selfexplore.training.dpo import StepDPOModule
    from selfexplore.training.optim import OptimizerConfig
    from selfexplore.training.sft import SFTModule

    options = {"train_size": 2000, "validation_size": 50, "test_size": 50}
    task = get_task("arith", **options)
    base = build_tiny_llama([task.prompt(p) + p.solution for p in task.load("train")], work / "base",
                            TinyLlamaConfig(**(SMOKE_MODEL if args.smoke else CHECK_MODEL)))
    spec = ModelSpec(path=str(base))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    sft = SFTModule(spec, optimizer=OptimizerConfig(lr=1e-3), export_dir=str(work / "sft"))
    timer = StepTimer()
    fit = trainer(args, work / "sft_fit", [timer])
    fit.fit(sft, datamodule=SFTDataModule(task="arith", task_options=options, batch_size=args.batch_size,
                                          max_length=160, val_limit=0))
    params = sum(p.numel() for p in sft.policy.parameters())
    throughput_figures("sft", timer, params, peak)
    del sft, fit  # as the pipeline: a unit's module and trainer are gone once it returns its policy
    free_before_engine("sampling after SFT, module and trainer dropped")
    sampler = HFSampler.from_pretrained(str(work / "sft"), batch_size=args.batch_size * 4, dtype="auto")  # GPU: bf16
    prompts = [task.prompt(p) for p in task.load("validation")][: args.prompts]
    start = time.perf_counter()
    sampler.generate(prompts, n=4, draws=DrawParams(0.7, 1.0, 64), seed=0)
    seconds = time.perf_counter() - start
    emit(figure="sampling_tokens_per_sec", value=round(sampler.generated_tokens / seconds, 1), backend="hf",
         sequences=4 * len(prompts))
    emit(figure="sampling_peak_memory", **stage_memory())
    del sampler

    pairs = pairs_file(task, work / "pairs.jsonl", count=args.batch_size * (args.steps + 2))
    dpo = StepDPOModule(ModelSpec(path=str(work / "sft")), optimizer=OptimizerConfig(lr=1e-5))
    timer = StepTimer()
    fit = trainer(args, work / "dpo_fit", [timer])
    fit.fit(dpo, datamodule=PreferenceDataModule(train_path=str(pairs), max_length=160, max_prompt_length=120,
                                                 batch_size=args.batch_size))
    throughput_figures("dpo", timer, params, peak)
    dpo.export(str(work / "dpo"))
    del dpo, fit  # what Pipeline.train_dpo leaves before the round's engines start: its exported policy only
    free_before_engine("after step-DPO, module and trainer dropped (the pipeline's next engine)")


# ----- the recipes as written ---------------------------------------------------------------------
def matrix() -> list[str]:
    """The recipe kinds tests/test_recipes_as_written.py runs on CPU, in its order (pipelines last)."""
    from recipe_configs import FSDP_STAGES, PIPELINES, QLORA_STAGES

    return [*FSDP_STAGES, *QLORA_STAGES, *PIPELINES]


def recipe_needs(name: str) -> list[str]:
    """The optional packages a recipe's run needs besides this check's own."""
    return (["bitsandbytes"] if name.endswith("-qlora") else []) + (["vllm"] if "-pipeline-" in name else [])


def missing_packages(names: Sequence[str]) -> list[str]:
    return [n for n in names if importlib.util.find_spec(n) is None]


def plan_recipes(names: Sequence[str], accelerator: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """The recipes to run on `accelerator` (None: no CUDA device), and a skipped line (every reason) for
    each of the others."""
    run, skipped = [], []
    for name in names:
        reasons = [] if accelerator else [NO_CUDA]
        reasons += [f"{package} is not installed ({PACKAGES[package]})"
                    for package in missing_packages(recipe_needs(name))]
        if reasons:
            needs = ["cuda"] * (accelerator is None) + recipe_needs(name)
            skipped.append({"figure": "recipe", "recipe": name, "needs": needs, "skipped": "; ".join(reasons)})
        else:
            run.append(name)
    return run, skipped


def run_recipe(name: str, accelerator: str, root: Path) -> dict[str, Any]:
    """One recipe as written but for the allowed keys (devices: 1), through the `selfexplore` CLI, in its own
    folder; what failed is the line's `error`, so the other recipes still run."""
    import recipe_configs as rc
    import recipe_worker

    import selfexplore.sampling.vllm_backend as vllm_backend
    import selfexplore.training.dpo as dpo
    from selfexplore.cli import main as cli

    work = root / name
    work.mkdir(parents=True, exist_ok=True)
    cwd, start = Path.cwd(), time.perf_counter()
    patched = [(dpo, "dpo_loss"), (Trainer, "fit"), (vllm_backend.VLLMSampler, "generate"),
               (vllm_backend.VLLMSampler, "open_stream")]
    saved = [(target, attr, getattr(target, attr)) for target, attr in patched]
    line: dict[str, Any] = {"figure": "recipe", "recipe": name}
    os.chdir(work)  # the recipes' paths (runs/, data/, models/) are relative to the working directory
    try:
        if "-pipeline-" in name:  # absolute model path: the pipeline resolves a relative one under its run dir
            written = rc.with_blocks(rc.recipe(name))
            config = rc.pipeline_run_config(name, str(work / rc.tiny_model_path(name)), accelerator, devices=1)
        else:
            written, config = rc.recipe(name), rc.stage_run_config(name, rc.tiny_model_path(name), accelerator, 1)
        changed = rc.changed_keys(written, config)
        line["changed_keys"] = sorted(changed)
        if changed - rc.ALLOWED_KEYS:
            raise RuntimeError(f"keys changed outside the allowed set: {sorted(changed - rc.ALLOWED_KEYS)}")
        rc.prepare(name, config)
        path = rc.write_config(config, work / f"{name}.yaml")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        recipe_worker.record_step0(work / "out")
        recipe_worker.count_fits()
        if "-pipeline-" in name:
            recipe_worker.scripted_texts()  # the engine really generates; the graded texts are scripted
        cli(["pipeline" if "-pipeline-" in name else "fit", "--config", str(path)])
        line.update(ok=True, **recipe_outcome(name, config, rc.step0_rows(work / "out")))
    except (Exception, SystemExit) as error:  # SystemExit: the CLI's one-line failures
        line.update(ok=False, error=f"{type(error).__name__}: {str(error)[-1500:]}")
    finally:
        for target, attr, value in saved:
            setattr(target, attr, value)
        os.chdir(cwd)
    line["seconds"] = round(time.perf_counter() - start, 1)
    line["peak_memory_gib"] = stage_memory()["peak_memory_gib"]  # None without CUDA
    return line


def recipe_outcome(name: str, config: dict[str, Any], step0: list[dict[str, Any]]) -> dict[str, Any]:
    """What a finished recipe proves: the step-0 DPO invariant (policy == reference: loss log 2, margin 0)
    in the recipe's precision, and an export of the recipe model's architecture."""
    from recipe_configs import STEP0_LOSS_TOLERANCE, STEP0_MARGIN_TOLERANCE

    out: dict[str, Any] = {}
    if step0:
        loss_gap = max(abs(r["loss"] - math.log(2)) for r in step0)
        margin = max(r["max_abs_margin"] for r in step0)
        out.update(step0_fits=len(step0), step0_max_abs_loss_minus_log2=loss_gap, step0_max_abs_margin=margin,
                   step0_autocast=all(r["autocast"] for r in step0), step0_tolerance=STEP0_LOSS_TOLERANCE,
                   step0_ok=loss_gap < STEP0_LOSS_TOLERANCE and margin < 2 * STEP0_MARGIN_TOLERANCE)
    elif "-dpo-" in name or "-pipeline-" in name:
        out.update(step0_ok=False, step0_fits=0)
    if "model" in config:
        export = Path(config["model"]["init_args"]["export_dir"])
        architectures = json.loads((export / "config.json").read_text())["architectures"]
        out.update(export_architectures=architectures, merged=not (export / "adapter_config.json").exists())
    else:
        out["report"] = (Path(config["pipeline"]["run_dir"]) / "report.md").is_file()
    return out


def recipes_worker(names: list[str], accelerator: str, root: str) -> dict[str, Any]:
    """Worker: every recipe of `names` in this fresh process (own CUDA context, own process group)."""
    torch.set_float32_matmul_precision("high")
    return {"lines": [run_recipe(name, accelerator, Path(root)) for name in names]}


def recipe_checks(names: Sequence[str], accelerator: str | None, work: Path,
                  timeout: float | None = None) -> list[dict[str, Any]]:
    """A line per recipe: skipped ones at once, the rest from one worker process on `accelerator`."""
    run, skipped = plan_recipes(names, accelerator)
    for line in skipped:
        emit(**line)
    if not run:
        return skipped
    payload = {"names": run, "accelerator": accelerator, "root": str(work / "recipes")}
    proc = spawn_worker(Path(__file__), "recipes", payload)
    try:
        lines = worker_result(proc, timeout=timeout)["lines"]
    except (RuntimeError, subprocess.TimeoutExpired) as error:  # it died or hung: say so for every recipe it had
        proc.kill()
        proc.communicate()
        lines = [{"figure": "recipe", "recipe": n, "ok": False, "error": f"worker: {type(error).__name__}: {error}"}
                 for n in run]
    for line in lines:
        emit(**line)
    return skipped + lines


def quickstart_config(run_dir: Path, args: argparse.Namespace) -> Any:
    """configs/quickstart.yaml as a PipelineConfig, on this device in bf16-mixed."""
    from selfexplore.explore.config import ExploreConfig
    from selfexplore.models import TinyLlamaConfig
    from selfexplore.pipeline.config import DPOStageConfig, PipelineConfig, SFTStageConfig, TrainerConfig
    from selfexplore.sampling.base import SamplingConfig
    from selfexplore.training.losses import DPOLossConfig
    from selfexplore.training.optim import OptimizerConfig, SchedulerConfig

    d = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())["pipeline"]

    def stage(cls: type, fields: dict[str, Any]) -> Any:
        built = {"optimizer": OptimizerConfig(**fields.pop("optimizer", {})),
                 "scheduler": SchedulerConfig(**fields.pop("scheduler", {}))}
        if "loss" in fields:
            built["loss"] = DPOLossConfig(**fields.pop("loss"))
        return cls(**fields, **built)

    d.update(run_dir=str(run_dir), from_scratch=TinyLlamaConfig(**d["from_scratch"]),
             trainer=TrainerConfig(**{**d["trainer"], "accelerator": args.accelerator, "precision": args.precision,
                                        "enable_progress_bar": False}),
             sft=stage(SFTStageConfig, d["sft"]), rft=stage(SFTStageConfig, d["rft"]),
             dpo=stage(DPOStageConfig, d["dpo"]),
             sampling=SamplingConfig(**d["sampling"]), explore=ExploreConfig(**d["explore"]))
    return PipelineConfig(**d)


def pipeline_check(args: argparse.Namespace, work: Path) -> None:
    if args.smoke:
        emit(figure="pipeline", skipped="smoke mode: the whole miniature pipeline is tests/test_pipeline.py's "
                                        "on CPU; here it runs on a GPU only")
        return
    import selfexplore.pipeline.run as pipeline_run

    starts = 0
    get_sampler = pipeline_run.get_sampler

    def recording(config: Any, model_path: str, *a: Any, **kw: Any) -> Any:
        nonlocal starts
        starts += 1
        sampler = get_sampler(config, model_path, *a, **kw)  # releases memory first, as every engine start
        free_before_engine(f"pipeline engine start {starts} ({Path(model_path).parent.name})")
        return sampler

    pipeline_run.get_sampler = recording
    start = time.perf_counter()
    try:
        report = pipeline_run.run_pipeline(quickstart_config(work / "run", args))
        state = json.loads((work / "run" / "state.json").read_text())["units"]
        accuracy = {k: v["result"].get("accuracy") for k, v in state.items()
                    if k.endswith("/eval") and isinstance(v, dict) and "result" in v}
        emit(figure="pipeline", seconds=round(time.perf_counter() - start, 1), engine_starts=starts,
             report=str(report), accuracy=accuracy, **stage_memory())
    except Exception as error:  # the other figures stay useful; say what stopped the run
        emit(figure="pipeline", seconds=round(time.perf_counter() - start, 1), error=f"{type(error).__name__}: {error}")
    finally:
        pipeline_run.get_sampler = get_sampler


def main(argv: list[str] | None = None) -> None:
    if serve_worker({"recipes": recipes_worker}, argv):
        return
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, no pipeline, no recipes unless --recipes names some: seconds, CPU or GPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps per throughput fit")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts sampled (4 completions each)")
    parser.add_argument("--recipes", default=None,
                        help="comma-separated recipe names, or 'none' (default: the test matrix; --smoke: none)")
    parser.add_argument("--recipe-timeout", type=float, default=240.0, help="seconds for the recipes' worker")
    parser.add_argument("--work", default=None, help="keep files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.accelerator = "gpu" if cuda else "cpu"
    args.precision = "bf16-mixed" if cuda else "32-true"  # bf16 autocast is 10-20x slower on CPUs
    args.steps = args.steps or (3 if args.smoke else 30)
    args.batch_size = args.batch_size or (4 if args.smoke else 32)
    args.prompts = args.prompts or (4 if args.smoke else 50)
    recipes = [] if args.recipes == "none" or (args.smoke and args.recipes is None) else (
        args.recipes.split(",") if args.recipes else matrix())
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = bf16_peak_tflops(name) if cuda else None
    emit(figure="env", torch=torch.__version__, cuda=torch.version.cuda, device=name, bf16_peak_tflops=peak,
         precision=args.precision, smoke=args.smoke, missing_packages=missing_packages(list(PACKAGES)),
         **({} if cuda else {"note": "no CUDA device: GPU-only figures are skipped with their reason"}))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        if cuda or args.smoke:
            torch.set_float32_matmul_precision("high")
            training_checks(args, work, peak)
        else:  # say what each check needs, build nothing
            for figure in CUDA_CHECKS:
                emit(figure=figure, needs=["cuda"], skipped=NO_CUDA)
        if recipes:
            # a CPU smoke run with --recipes runs them on the CPU (the test suite's check of this path)
            accelerator = args.accelerator if cuda or args.smoke else None
            recipe_checks(recipes, accelerator, work, timeout=args.recipe_timeout)
        elif args.smoke:
            emit(figure="recipe", skipped="smoke mode: no recipes unless --recipes names some")
        if not cuda:
            emit(figure="pipeline", needs=["cuda"], skipped=NO_CUDA if not args.smoke else
                 "smoke mode on CPU: the whole miniature pipeline is tests/test_pipeline.py's; here it runs on a GPU")
        else:
            pipeline_check(args, work)
    emit(figure="done", seconds=round(time.perf_counter() - started, 1))


if __name__ == "__main__":
    main()
