"""Command line: LightningCLI for `fit`/`validate`/`test`, plus the method's own stages.

    selfexplore pipeline --config configs/quickstart.yaml      # the whole method, resumable
    selfexplore fit --config configs/quickstart/sft.yaml        # one training stage
    selfexplore test --config configs/quickstart/sft.yaml
    selfexplore sample --policy DIR --task arith --out samples.jsonl --sampling.n 8
    selfexplore pairs --samples samples.jsonl --out_dir DIR
    selfexplore explore --explorer DIR --task arith --pairs DIR/pairs.jsonl --out_dir DIR
    selfexplore <command> --help / --print_config

Model and data classes are chosen in the YAML (`class_path`), so the same entry point runs
SFT (`selfexplore.training.sft.SFTModule` + `selfexplore.data.sft.SFTDataModule`) and step-level DPO.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from selfexplore.explore.builders import build_outcome_pairs, build_rft_set, sample_stats
from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.stage import run_explore_stage
from selfexplore.io import read_jsonl, write_json, write_jsonl
from selfexplore.models import load_tokenizer
from selfexplore.models.chat import PromptFormat
from selfexplore.pipeline.config import PipelineConfig
from selfexplore.pipeline.run import run_pipeline
from selfexplore.sampling.base import SamplingConfig, get_sampler, resolve_backend
from selfexplore.sampling.stage import run_sample_stage
from selfexplore.tasks import Problem, Task, get_task

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


class SelfExploreCLI(LightningCLI):
    """LightningCLI with our defaults: CSV logging, subclass mode for module and data."""


def lightning_main(args: list[str] | None = None) -> SelfExploreCLI:
    return SelfExploreCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs"}}},
        save_config_kwargs={"overwrite": True},
    )


def pipeline(pipeline: PipelineConfig, force: bool = False) -> None:
    """Run (or resume) the whole method; prints the report table (rank 0; see `pipeline.run`)."""
    report = run_pipeline(pipeline, force=force)
    if report is not None:
        print(report.read_text())


def _problems(task: str, task_options: dict[str, Any] | None, split: str, data_path: str | None,
              limit: int | None) -> tuple[Task, list[Problem]]:
    t = get_task(task, **(task_options or {}))
    return t, t.load(split, path=data_path)[:limit]


def sample(policy: str, out: str, task: str = "arith", task_options: dict[str, Any] | None = None,
           split: str = "train", data_path: str | None = None, limit: int | None = None,
           adapter: str | None = None, sampling: SamplingConfig | None = None, force: bool = False,
           prompt_format: PromptFormat | None = None) -> None:
    """N graded samples per question of `policy` (HF folder or gguf: spec, optional LoRA adapter) -> `out`.

    `prompt_format` must be the one the policy was trained with (raw prompts by default).
    """
    s = sampling or SamplingConfig()
    fmt = prompt_format or PromptFormat()
    t, problems = _problems(task, task_options, split, data_path, limit)
    prompt = fmt.prompter(t, load_tokenizer(policy) if fmt.chat_template else None)
    sampler = get_sampler(s, policy, adapter, cache_dir=str(Path(out).parent / "cache"))
    try:
        stats = run_sample_stage(sampler, t, problems, out, n=s.n, temperature=s.temperature, top_p=s.top_p,
                                 max_new_tokens=s.max_new_tokens, stop=s.stop, seed=s.seed,
                                 backend_name=resolve_backend(s.backend), model=policy,
                                 settings={"batch_size": s.batch_size, "adapter": adapter}, force=force, prompt=prompt)
    finally:
        getattr(sampler, "close", lambda: None)()
    print(json.dumps(stats.to_dict()))


def pairs(samples: str, out_dir: str, max_per_question: int = 8, round: int = 1) -> None:
    """RFT set (rft.jsonl), outcome pairs (pairs.jsonl) and stats from graded samples."""
    records = read_jsonl(samples)
    rft = build_rft_set(records, max_per_question=max_per_question)
    outcome = build_outcome_pairs(records, round=round, max_per_question=max_per_question)
    write_jsonl(Path(out_dir) / "rft.jsonl", rft)
    write_jsonl(Path(out_dir) / "pairs.jsonl", outcome)
    stats = {**sample_stats(records), "rft_records": len(rft), "pairs": len(outcome)}
    write_json(Path(out_dir) / "sample_stats.json", stats)
    print(json.dumps(stats))


def explore(explorer: str, pairs: str, out_dir: str, task: str = "arith",
            task_options: dict[str, Any] | None = None, data_path: str | None = None,
            config: ExploreConfig | None = None, sampling: SamplingConfig | None = None) -> None:
    """First-pit search over the rejected rationales of `pairs` -> explore.jsonl, gpairs.jsonl."""
    t, problems = _problems(task, task_options, "train", data_path, None)
    sampler = get_sampler(sampling or SamplingConfig(), explorer, cache_dir=str(Path(out_dir) / "cache"))
    try:
        stats = run_explore_stage(sampler, t, pairs, {p.id: p for p in problems}, out_dir, config or ExploreConfig())
    finally:
        getattr(sampler, "close", lambda: None)()
    print(json.dumps(stats))


STAGE_COMMANDS = {"pipeline": pipeline, "sample": sample, "pairs": pairs, "explore": explore}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGE_COMMANDS:
        from jsonargparse import CLI

        CLI(STAGE_COMMANDS[argv[0]], args=argv[1:], as_positional=False)
        return
    lightning_main(argv)


if __name__ == "__main__":
    main()
