"""One FSDP2 step-DPO fit on 2 gloo CPU processes; each rank writes what it loaded and its peak RSS.

    python tests/fsdp_dpo_worker.py MODEL PAIRS OUT [--steps N] [--precision 32-true]

Run by tests/test_dpo.py and bench/bench_memory.py (which also runs it against an older
checkout). Lightning restarts this script for rank 1, so the counters below exist on both
ranks. Writes OUT/rank{r}.json: checkpoint reads (`from_pretrained`), meta builds
(`from_config`), and the peak RSS in MiB (the process's high-water mark, so each figure
includes the earlier ones) once the model is loaded and sharded, after the reference pass,
after the last step (before the export) and at the end; the reference table lands in
OUT/reference_cache.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from transformers import AutoModelForCausalLM

from selfexplore.data.preference import PreferenceDataModule
from selfexplore.models import ModelSpec
from selfexplore.training.dpo import StepDPOModule

COUNTS = {"from_pretrained": 0, "from_config": 0}


def _counting(name: str):
    original = getattr(AutoModelForCausalLM, name).__func__

    def counted(cls, *args, **kwargs):
        COUNTS[name] += 1
        return original(cls, *args, **kwargs)
    return classmethod(counted)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PhasePeaks(Callback):
    """Peak RSS so far at the ends of the fit's phases. Callbacks' hooks run before the module's:
    on_fit_start before the reference pass, on_train_end before the export."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: object) -> None:
        self.peaks["load_peak_rss_mib"] = peak_rss_mib()

    def on_train_start(self, trainer: Trainer, pl_module: object) -> None:
        self.peaks["reference_peak_rss_mib"] = peak_rss_mib()

    def on_train_end(self, trainer: Trainer, pl_module: object) -> None:
        self.peaks["train_peak_rss_mib"] = peak_rss_mib()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("pairs")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in COUNTS:
        setattr(AutoModelForCausalLM, name, _counting(name))
    out = Path(args.out)
    module = StepDPOModule(ModelSpec(path=args.model), reference_path=args.model,  # the reference is the start
                           reference_cache_dir=str(out / "reference_cache"), export_dir=str(out / "policy"))
    data = PreferenceDataModule(train_path=args.pairs, max_length=args.max_length,
                                max_prompt_length=args.max_length * 2 // 3, batch_size=args.batch_size)
    trainer = Trainer(accelerator="cpu", devices=2, precision=args.precision, max_steps=args.steps,
                      strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(out), callbacks=[phases := PhasePeaks()])
    trainer.fit(module, datamodule=data)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {**COUNTS, **phases.peaks, "peak_rss_mib": peak_rss_mib(), "pid": os.getpid()}))


if __name__ == "__main__":
    main()
