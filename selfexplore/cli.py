"""Command line: the method's stages and LightningCLI's `fit`/`validate`/`test`, one entry point.

    selfexplore pipeline --config configs/quickstart.yaml      # the whole method, resumable
    selfexplore status runs/quickstart                          # done / running / failed / next
    selfexplore fit --config configs/quickstart/sft.yaml        # one training stage
    selfexplore test --config configs/quickstart/sft.yaml
    selfexplore sample --policy DIR --task arith --out samples.jsonl --sampling.n 8
    selfexplore pairs --samples samples.jsonl --out_dir DIR
    selfexplore explore --explorer DIR --task arith --pairs DIR/pairs.jsonl --out_dir DIR
    selfexplore prm-data --explore DIR/explore.jsonl --samples DIR/explorer_samples.jsonl --out DIR/prm.jsonl
    selfexplore <command> --help / --print_config

`python cli.py ...` in a checkout is the same entry point. Model and data classes are chosen in
the YAML (`class_path`), so `fit` runs SFT (`selfexplore.training.sft.SFTModule` +
`selfexplore.data.sft.SFTDataModule`) and step-level DPO alike.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from selfexplore.explore.builders import build_outcome_pairs, build_rft_set, read_samples, sample_stats
from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.stage import run_explore_stage
from selfexplore.io import DataError, write_json, write_jsonl
from selfexplore.models import load_tokenizer
from selfexplore.models.chat import PromptFormat
from selfexplore.pipeline.config import PipelineConfig
from selfexplore.pipeline.lock import RunLocked
from selfexplore.prm.config import ConsensusConfig, PRMDataConfig
from selfexplore.sampling.base import SamplingConfig
from selfexplore.sampling.factory import get_sampler
from selfexplore.sampling.stage import run_sample_stage
from selfexplore.shards import StageContext
from selfexplore.tasks import Problem, Task, get_task

# LightningCLI's commands this project supports (no `predict`: no module defines a predict_step),
# with the line the root help shows for each.
LIGHTNING_SUBCOMMANDS = {
    "fit": "Train one stage from a YAML config (SFT, RFT or step-level DPO; LightningCLI)",
    "validate": "Evaluate a module on its validation split (LightningCLI)",
    "test": "Evaluate a module on its test split (LightningCLI)",
}


class SelfExploreCLI(LightningCLI):
    """LightningCLI with our defaults: CSV logging, subclass mode for module and data."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in LIGHTNING_SUBCOMMANDS}

    def before_instantiate_classes(self) -> None:
        """Refuse a config this machine cannot run (a GPU it lacks, a model it cannot load) before the
        Trainer or the model is built, naming the key and the override (`selfexplore.preflight`)."""
        from selfexplore.preflight import accelerator_problem, model_problem, refuse_unrunnable

        config = self.config[self.subcommand] if self.subcommand else self.config
        problems = [accelerator_problem(config.get("trainer", {}).get("accelerator", "auto"))]
        init = (config.get("model") or {}).get("init_args") or {}
        spec = init.get("model") if hasattr(init, "get") else None
        path = spec.get("path") if hasattr(spec, "get") else getattr(spec, "path", None)
        if path and not init.get("from_scratch"):
            problems.append(model_problem(str(path), "model.init_args.model.path"))
        refuse_unrunnable(problems)


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


def pipeline(pipeline: PipelineConfig, force: bool = False, verbose: bool = False) -> None:
    """Run (or resume) the whole method, unit by unit, then print the report table.

    `verbose` shows what libraries print (Lightning banners, transformers' loading bars, known
    harmless warnings); `run_dir/pipeline.log` has it either way.
    """
    from selfexplore.pipeline.run import run_pipeline  # the training stack: only for this command
    from selfexplore.preflight import accelerator_problem, backend_problem, model_problem, refuse_unrunnable

    refuse_unrunnable([  # before any unit: not after an SFT fit, at the first engine or the first GPU call
        accelerator_problem(pipeline.trainer.accelerator, "pipeline."),
        backend_problem(pipeline.sampling.backend, "pipeline."),
        None if pipeline.from_scratch is not None else model_problem(pipeline.model.path, "pipeline.model.path")])
    report = run_pipeline(pipeline, force=force, verbose=verbose)
    if report is not None:
        print(report.read_text())


def status(run_dir: str) -> None:
    """Units of a run: done, running, failed (with its error), their times, and what comes next."""
    from selfexplore.pipeline.status import render_status

    print(render_status(run_dir))


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
    with get_sampler(s, policy, adapter, cache_dir=str(Path(out).parent / "cache")) as sampler:
        stats = run_sample_stage(sampler, t, problems, out, s, StageContext(model=policy, force=force, prompt=prompt),
                                 settings={"batch_size": s.batch_size, "adapter": adapter})
    print(json.dumps(stats.to_dict()))


def pairs(samples: str, out_dir: str, max_per_question: int = 8, round: int = 1) -> None:
    """RFT set (rft.jsonl), outcome pairs (pairs.jsonl) and stats from graded samples.

    The samples file is checked before anything is written: a bad record or an empty file is an
    error (file, line, field) and leaves earlier outputs in `out_dir` as they were.
    """
    records = read_samples(samples)
    rft = build_rft_set(records, max_per_question=max_per_question)
    outcome = build_outcome_pairs(records, round_index=round, max_per_question=max_per_question)
    write_jsonl(Path(out_dir) / "rft.jsonl", rft)
    write_jsonl(Path(out_dir) / "pairs.jsonl", outcome)
    stats = {**sample_stats(records), "rft_records": len(rft), "pairs": len(outcome)}
    write_json(Path(out_dir) / "sample_stats.json", stats)
    print(json.dumps(stats))


def explore(explorer: str, pairs: str, out_dir: str, task: str = "arith",
            task_options: dict[str, Any] | None = None, data_path: str | None = None,
            explore: ExploreConfig | None = None, sampling: SamplingConfig | None = None,
            force: bool = False) -> None:
    """First-pit search over the rejected rationales of `pairs` -> explore.jsonl, gpairs.jsonl.

    `task`, `task_options` and `data_path` must load the problems the pairs were made from
    (each pair's prompt is checked against its problem). `explore.stop` unset: `sampling.stop`.
    A rerun resumes; one with another explorer, settings or pairs is refused unless `force`.
    """
    s = sampling or SamplingConfig()
    t, problems = _problems(task, task_options, "train", data_path, None)
    with get_sampler(s, explorer, cache_dir=str(Path(out_dir) / "cache")) as sampler:
        stats = run_explore_stage(sampler, t, pairs, {p.id: p for p in problems}, out_dir,
                                  (explore or ExploreConfig()).inherit_stop(s.stop),
                                  StageContext(model=explorer, force=force))
    print(json.dumps(stats))


def prm_data(explore: str, samples: str, out: str, task: str = "arith", task_options: dict[str, Any] | None = None,
             data_path: str | None = None, k: int | None = None, round: int | None = None,
             prm: PRMDataConfig | None = None, explorer: str | None = None,
             consensus: ConsensusConfig | None = None, sampling: SamplingConfig | None = None) -> None:
    """Process-reward rows (TRL stepwise supervision) from an explore file -> `out` (prm.jsonl).

    `samples` is the file the exploration's pairs were made from (`round_r/explorer_samples.jsonl`):
    its correct rationales become outcome-labelled rows, and every explored rationale must be one
    of its samples. `task`, `task_options`, `data_path` load the problems the run used; `k` and
    `round` default to what the exploration recorded (shard manifest, `round_N` folder). With
    `consensus`, `explorer` (a model folder, sampled as `sampling` says) re-explores every pit.
    """
    from selfexplore.prm.data import write_prm_data

    t, problems = _problems(task, task_options, "train", data_path, None)
    by_id = {p.id: p for p in problems}
    if consensus is None:
        stats = write_prm_data(explore, samples, out, t, by_id, k=k, round_index=round, config=prm)
    else:
        if explorer is None:
            raise SystemExit("prm-data: --consensus needs --explorer (the model to draw fresh completions from)")
        with get_sampler(sampling or SamplingConfig(), explorer, cache_dir=str(Path(out).parent / "cache")) as sampler:
            stats = write_prm_data(explore, samples, out, t, by_id, k=k, round_index=round, config=prm,
                                   sampler=sampler, consensus=consensus)
    print(json.dumps(stats))


STAGE_COMMANDS = {"pipeline": pipeline, "status": status, "sample": sample, "pairs": pairs, "explore": explore,
                  "prm-data": prm_data}


DESCRIPTION = ("Self-Explore for LLM math reasoning: SFT, sampling, RFT, first-pit exploration and step-level "
               "DPO, round after round.")


def _version() -> str:
    try:
        return version("selfexplore")
    except PackageNotFoundError:  # `python cli.py` from a checkout that was never pip-installed
        return "unknown (not installed)"


def _root_parser() -> argparse.ArgumentParser:
    """Lists every command; each command parses its own options (jsonargparse or LightningCLI)."""
    parser = argparse.ArgumentParser(prog="selfexplore", description=DESCRIPTION,
                                     epilog="Run `selfexplore COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"selfexplore {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, function in STAGE_COMMANDS.items():
        commands.add_parser(name, help=function.__doc__.split("\n")[0], add_help=False)
    for name, line in LIGHTNING_SUBCOMMANDS.items():
        commands.add_parser(name, help=line, add_help=False)
    return parser


def _check_config_files(args: list[str]) -> None:
    """Name the file of a YAML syntax error (the parsers report only a line of "<unicode string>")."""
    import yaml

    for flag, value in zip(args, args[1:]):
        if flag.startswith("--") and value.endswith((".yaml", ".yml")) and Path(value).is_file():
            try:
                yaml.safe_load(Path(value).read_text(encoding="utf-8"))
            except yaml.YAMLError as error:
                raise SystemExit(f"{value}: not valid YAML ({flag}): {error}") from None


def expected_failures() -> tuple[type[BaseException], ...]:
    """Errors a user meets and acts on from their message alone (a run locked, another config,
    bad data, a unit that cannot go on): one line on the console, not a Python traceback."""
    from selfexplore.pipeline.state import PipelineError, RankZeroFailed, RunStateError

    return RunLocked, RunStateError, PipelineError, RankZeroFailed, DataError


def _verbose(args: list[str]) -> bool:
    """Whether the command line says `--verbose true` (or `--verbose=true`)."""
    flags = [a.split("=", 1)[1] if a.startswith("--verbose=") else b for a, b in zip(args, [*args[1:], ""])
             if a == "--verbose" or a.startswith("--verbose=")]
    return any(f.lower() in ("true", "1", "yes") for f in flags)


def main(argv: list[str] | None = None) -> None:
    """`selfexplore COMMAND ...`: only the command that runs imports what it needs."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _root_parser()
    if not args:
        parser.print_help(sys.stderr)
        raise SystemExit(2)
    command = parser.parse_args(args[:1]).command
    _check_config_files(args[1:])
    if command in STAGE_COMMANDS:
        from jsonargparse import CLI

        try:
            CLI(STAGE_COMMANDS[command], args=args[1:], as_positional=command == "status")
        except expected_failures() as error:
            if _verbose(args):
                raise
            where = " (the traceback is in the run directory's pipeline.log; --verbose true shows it here)" \
                if command == "pipeline" and not isinstance(error, RunLocked) else ""
            raise SystemExit(f"selfexplore {command}: {type(error).__name__}: {error}{where}") from None
        return
    # From the command line LightningCLI reads sys.argv itself (given both, it warns).
    lightning_main(None if argv is None else args)


if __name__ == "__main__":
    main()
