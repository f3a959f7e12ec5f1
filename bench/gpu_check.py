"""GPU check: the miniature pipeline in bf16 on one CUDA GPU, training throughput/MFU, memory per stage.

    python bench/gpu_check.py                 # one CUDA GPU, under 8 minutes
    python bench/gpu_check.py --smoke         # CPU (or GPU) in seconds: tiny sizes, pipeline skipped

Needs only torch, transformers, peft, lightning, torchmetrics, sympy, tokenizers, safetensors and
matplotlib (no vLLM, no bitsandbytes, no downloads): everything is built from scratch. One JSON
line per figure; a figure this device cannot give is a line with "skipped" and the reason.

- env: torch / CUDA versions, the GPU, its dense bf16 peak (for MFU; table below).
- sft, dpo: tokens/s (real tokens of the steps after the first, forward + backward + optimizer),
  MFU = 6 x parameters x tokens/s / bf16 peak, peak accelerator memory of the fit.
- sampling: HF generate tokens/s and its peak memory.
- free_before_engine: what `mem_get_info` reports, after `offload_training_state` and
  `release_accelerator_memory`, with a trained DPO module still alive (as in the round callback),
  and the `gpu_memory_utilization: auto` value vLLM would get.
- pipeline: configs/quickstart.yaml's whole run (SFT, RFT, exploration, outcome DPO, 2 Self-Explore
  rounds) in bf16-mixed on the GPU, with the free memory before every engine start it makes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from selfexplore.memory import (  # noqa: E402
    GIB,
    accelerator_memory,
    auto_memory_utilization,
    offload_training_state,
    release_accelerator_memory,
)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets.
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 6000 Ada": 364.0, "B200": 2250.0}
CHECK_MODEL = {"hidden_size": 512, "num_layers": 8, "num_heads": 8, "num_kv_heads": 8, "intermediate_size": 1408,
               "vocab_size": 512, "max_position_embeddings": 256}
SMOKE_MODEL = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128,
               "vocab_size": 300, "max_position_embeddings": 256}


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


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
         auto_gpu_memory_utilization=auto)


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
    trainer(args, work / "sft_fit", [timer]).fit(
        sft, datamodule=SFTDataModule(task="arith", task_options=options, batch_size=args.batch_size,
                                      max_length=160, val_limit=0))
    params = sum(p.numel() for p in sft.policy.parameters())
    throughput_figures("sft", timer, params, peak)

    free_before_engine("sampling after SFT")
    sampler = HFSampler.from_pretrained(str(work / "sft"), batch_size=args.batch_size * 4, dtype="auto")  # GPU: bf16
    prompts = [task.prompt(p) for p in task.load("validation")][: args.prompts]
    start = time.perf_counter()
    sampler.generate(prompts, n=4, temperature=0.7, top_p=1.0, max_new_tokens=64, stop=None, seed=0)
    seconds = time.perf_counter() - start
    emit(figure="sampling_tokens_per_sec", value=round(sampler.generated_tokens / seconds, 1), backend="hf",
         sequences=4 * len(prompts))
    emit(figure="sampling_peak_memory", **stage_memory())
    del sampler

    pairs = pairs_file(task, work / "pairs.jsonl", count=args.batch_size * (args.steps + 2))
    dpo = StepDPOModule(ModelSpec(path=str(work / "sft")), optimizer=OptimizerConfig(lr=1e-5))
    timer = StepTimer()
    trainer(args, work / "dpo_fit", [timer]).fit(
        dpo, datamodule=PreferenceDataModule(train_path=str(pairs), max_length=160, max_prompt_length=120,
                                             batch_size=args.batch_size))
    throughput_figures("dpo", timer, params, peak)
    offload_training_state(dpo.trainer.optimizers, [dpo])  # what the round callback does before engines start
    free_before_engine("after step-DPO, trainer alive (round callback)")


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
             sft=stage(SFTStageConfig, d["sft"]), rft=stage(SFTStageConfig, d["rft"]), dpo=stage(DPOStageConfig, d["dpo"]),
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no pipeline: seconds, CPU or GPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps per throughput fit")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts sampled (4 completions each)")
    parser.add_argument("--work", default=None, help="keep files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.accelerator = "gpu" if cuda else "cpu"
    args.precision = "bf16-mixed" if cuda else "32-true"  # bf16 autocast is 10-20x slower on CPUs
    args.steps = args.steps or (3 if args.smoke else 30)
    args.batch_size = args.batch_size or (4 if args.smoke else 32)
    args.prompts = args.prompts or (4 if args.smoke else 50)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = bf16_peak_tflops(name) if cuda else None
    emit(figure="env", torch=torch.__version__, cuda=torch.version.cuda, device=name, bf16_peak_tflops=peak,
         precision=args.precision, smoke=args.smoke,
         **({} if cuda else {"note": "no CUDA device: GPU-only figures are skipped with their reason"}))
    if not cuda and not args.smoke:
        emit(figure="pipeline", skipped="no CUDA device; run with --smoke on CPU")
        return
    torch.set_float32_matmul_precision("high")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        training_checks(args, work, peak)
        pipeline_check(args, work)


if __name__ == "__main__":
    main()
