"""GPU recipes: every file runs on CPU with the 7B model swapped for a tiny one, and the family agrees.

`configs/recipes/` holds, for each dataset x model cell, SFT and step-DPO LightningCLI configs
for QLoRA on one GPU and FSDP2 on 8 GPUs, and a pipeline config for each of the two, which
includes the dataset's shared vLLM `sampling/` and `explore/` blocks. The files are complete on
their own, so the consistency tests below are what keeps them one family: recipes of a kind
differ only along their dataset / model axes, QLoRA and FSDP agree on everything but the
learning rate (QLoRA: 20x), and each pipeline config trains exactly as its cell's recipes.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import ArgumentParser, capture_parser

from selfexplore.cli import main
from selfexplore.pipeline.config import PipelineConfig
from selfexplore.pipeline.run import Pipeline
from selfexplore.training.losses import DPOLossConfig
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
DATASETS = ("gsm8k", "math")
MODELS = ("mistral7b", "llemma7b", "deepseekmath7b")
STRATEGIES = ("qlora", "fsdp")
CELLS = [(d, m) for d in DATASETS for m in MODELS]
STAGE_RECIPES = [RECIPES / f"{d}-{m}-{stage}-{s}.yaml"
                 for d, m in CELLS for stage in ("sft", "dpo") for s in STRATEGIES]
PIPELINE_RECIPES = [RECIPES / f"{d}-{m}-pipeline-{s}.yaml" for d, m in CELLS for s in STRATEGIES]
QLORA_LR_FACTOR = 20  # a LoRA adapter's lr over the paper's full-weight lr
# Flattened keys that may change with the dataset or with the model; every other key is the same
# across a kind (run directories are normalised first).
BY_DATASET = {"data.init_args.task", "data.init_args.data_dir", "data.init_args.max_length",
              "data.init_args.max_prompt_length", "data.init_args.batch_size", "data.init_args.eval_batch_size",
              "trainer.accumulate_grad_batches", "model.init_args.eval_max_new_tokens"}
BY_MODEL = {"model.init_args.model.path", "model.init_args.optimizer.lr"}


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _recipe(dataset: str, model: str, stage: str, strategy: str) -> dict[str, Any]:
    return _load(RECIPES / f"{dataset}-{model}-{stage}-{strategy}.yaml")


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in d.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _subset(actual: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """The entries of `actual` that `expected` names, recursively (to compare with `expected`)."""
    return {k: _subset(actual[k], v) if isinstance(v, dict) else actual[k] for k, v in expected.items()}


def _effective_batch(config: dict[str, Any]) -> int:
    trainer = config["trainer"]
    return trainer["devices"] * trainer.get("accumulate_grad_batches", 1) * config["data"]["init_args"]["batch_size"]


def _stage_parser(command: str) -> ArgumentParser:
    """The parser `selfexplore <command>` builds, without running the command."""
    return capture_parser(lambda: main([command]))


def _pipeline_config(path: Path, *overrides: str) -> PipelineConfig:
    parser = _stage_parser("pipeline")
    return parser.instantiate_classes(parser.parse_args(["--config", str(path), *overrides])).pipeline


def _data_dir(tmp_path: Path, task: str) -> Path:
    """Train/validation/test files in the task's original layout (GSM8K `#### N`, MATH `\\boxed{}`)."""
    data = tmp_path / task
    data.mkdir()
    if task == "gsm8k":
        rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
                 "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
                for i in range(1, 17)]
    else:
        rows = [{"problem": f"Compute ${i} + {i + 2}$.", "solution": f"We add: ${i} + {i + 2} = {2 * i + 2}$. "
                 f"So the sum is $\\boxed{{{2 * i + 2}}}$."} for i in range(1, 17)]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _pairs(path: Path) -> Path:
    rows = [{"prompt": f"Tom has {i} apples and buys 2 more.\n", "chosen": f"{i} + 2 = {i + 2}\nThe answer is {i + 2}",
             "rejected": f"{i} + 2 = {i + 3}\nThe answer is {i + 3}"} for i in range(8)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_family_is_complete() -> None:
    found = {p.relative_to(RECIPES).as_posix() for p in RECIPES.rglob("*.yaml")}
    expected = {p.name for p in STAGE_RECIPES + PIPELINE_RECIPES}
    expected |= {f"{block}/{d}.yaml" for block in ("sampling", "explore") for d in DATASETS}
    assert found == expected


@pytest.mark.parametrize("recipe", STAGE_RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step_with_a_tiny_model(recipe: Path, tiny_arith_model: Path, tmp_path: Path) -> None:
    config = _load(recipe)
    assert config["trainer"]["accelerator"] == "gpu"  # the recipe itself targets GPUs
    overrides = [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--model.init_args.model.path", str(tiny_arith_model), "--model.init_args.model.dtype", "float32",
        "--model.init_args.export_dir", str(tmp_path / "policy"),
    ]
    if "lora" in config["model"]["init_args"]["model"]:
        overrides += ["--model.init_args.model.lora.r", "4"]
    data = config["data"]["init_args"]
    if "task" in data:
        overrides += ["--data.init_args.data_dir", str(_data_dir(tmp_path, data["task"])),
                      "--data.init_args.max_length", "96"]
    else:
        overrides += ["--data.init_args.train_path", str(_pairs(tmp_path / "gpairs.jsonl")),
                      "--data.init_args.max_length", "96", "--data.init_args.max_prompt_length", "48"]
    main(["fit", "--config", str(recipe), *overrides])
    assert (tmp_path / "policy" / "config.json").is_file()


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_recipes_of_a_kind_differ_only_along_their_axes(stage: str, strategy: str) -> None:
    values: dict[str, dict[tuple[str, str], Any]] = defaultdict(dict)
    for d, m in CELLS:
        run_dir = f"runs/{d}-{m}-{strategy}"
        for key, value in _flatten(_recipe(d, m, stage, strategy)):
            values[key][d, m] = value.replace(run_dir, "runs/<cell>") if isinstance(value, str) else value
    for key, by_cell in values.items():
        assert len(by_cell) == len(CELLS), f"{key} is missing from some {stage}-{strategy} recipes"
        if key in BY_DATASET:
            groups = [[by_cell[d, m] for m in MODELS] for d in DATASETS]
        elif key in BY_MODEL:
            groups = [[by_cell[d, m] for d in DATASETS] for m in MODELS]
        else:
            groups = [list(by_cell.values())]
        for group in groups:
            assert len({json.dumps(v) for v in group}) == 1, f"{stage}-{strategy}: {key} differs: {by_cell}"


@pytest.mark.parametrize("stage", ["sft", "dpo"])
@pytest.mark.parametrize(("dataset", "model"), CELLS)
def test_qlora_and_fsdp_recipes_agree(dataset: str, model: str, stage: str) -> None:
    qlora, fsdp = (_recipe(dataset, model, stage, s) for s in STRATEGIES)
    assert _effective_batch(qlora) == _effective_batch(fsdp)
    assert qlora["trainer"]["max_epochs"] == fsdp["trainer"]["max_epochs"]
    assert qlora["trainer"]["gradient_clip_val"] == fsdp["trainer"]["gradient_clip_val"]
    q_model, f_model = qlora["model"]["init_args"], fsdp["model"]["init_args"]
    assert q_model["optimizer"]["lr"] == pytest.approx(QLORA_LR_FACTOR * f_model["optimizer"]["lr"])
    assert _without(q_model["optimizer"], "lr") == _without(f_model["optimizer"], "lr")
    per_mode = ("model", "optimizer", "reference", "export_dir", "export_merged", "eval_max_new_tokens")
    assert _without(q_model, *per_mode) == _without(f_model, *per_mode)  # beta, loss, schedule ...
    per_run = ("batch_size", "eval_batch_size", "val_limit", "train_path")
    q_data, f_data = (_without(c["data"]["init_args"], *per_run) for c in (qlora, fsdp))
    assert q_data == f_data  # task, data, lengths


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_pipeline_recipe_trains_as_its_cell_recipes(recipe: Path) -> None:
    dataset, model, _, strategy = recipe.stem.split("-")
    config = _pipeline_config(recipe)
    sft, dpo = _recipe(dataset, model, "sft", strategy), _recipe(dataset, model, "dpo", strategy)
    sft_args, dpo_args = sft["model"]["init_args"], dpo["model"]["init_args"]
    sft_data, dpo_data = sft["data"]["init_args"], dpo["data"]["init_args"]

    assert (config.task, config.data_dir) == (sft_data["task"], sft_data["data_dir"])
    assert config.seed == sft["seed_everything"] == dpo["seed_everything"]
    assert _subset(asdict(config.model), sft_args["model"]) == sft_args["model"]
    strategy_name = "fsdp2" if "strategy" in sft["trainer"] else "auto"  # fsdp2: ModelParallelStrategy
    assert (config.trainer.accelerator, config.trainer.devices, config.trainer.strategy, config.trainer.precision,
            config.trainer.gradient_clip_val) == ("gpu", sft["trainer"]["devices"], strategy_name,
                                                  sft["trainer"]["precision"], sft["trainer"]["gradient_clip_val"])
    # One schema: the pipeline's stages hold the very objects `fit`'s modules take.
    assert config.sft.optimizer == OptimizerConfig(**sft_args["optimizer"])
    assert config.sft.scheduler == SchedulerConfig(**sft_args["scheduler"])
    sft_stage = {"epochs": sft["trainer"]["max_epochs"], "batch_size": sft_data["batch_size"],
                 "accumulate_grad_batches": sft["trainer"].get("accumulate_grad_batches", 1),
                 "max_length": sft_data["max_length"], "include_prompt_in_loss": sft_data["include_prompt_in_loss"]}
    assert _subset(asdict(config.sft), sft_stage) == sft_stage
    assert config.rft == config.sft
    assert config.dpo.optimizer == OptimizerConfig(**dpo_args["optimizer"])
    assert config.dpo.scheduler == SchedulerConfig(**dpo_args["scheduler"])
    assert config.dpo.loss == DPOLossConfig(**dpo_args["loss"])
    dpo_stage = {"epochs": dpo["trainer"]["max_epochs"], "reference": dpo_args["reference"],
                 "batch_size": dpo_data["batch_size"],
                 "accumulate_grad_batches": dpo["trainer"].get("accumulate_grad_batches", 1),
                 "max_length": dpo_data["max_length"], "max_prompt_length": dpo_data["max_prompt_length"]}
    assert _subset(asdict(config.dpo), dpo_stage) == dpo_stage
    # the dataset's shared blocks; one generation budget for sampling, exploring and evaluating
    assert config.sampling.backend == "vllm"
    assert config.sampling.max_new_tokens == config.explore.max_new_tokens == config.eval_max_new_tokens
    qlora_sft = _recipe(dataset, model, "sft", "qlora")["model"]["init_args"]  # FSDP SFT does not evaluate
    assert config.eval_max_new_tokens == qlora_sft["eval_max_new_tokens"]


@pytest.mark.parametrize("dataset", DATASETS)
def test_shared_blocks_parse_for_the_stage_commands(dataset: str) -> None:
    sample, explore = _stage_parser("sample"), _stage_parser("explore")
    sampling = sample.instantiate_classes(sample.parse_args(
        ["--policy", "p", "--out", "o", "--sampling", str(RECIPES / "sampling" / f"{dataset}.yaml")])).sampling
    exploring = explore.instantiate_classes(explore.parse_args(
        ["--explorer", "p", "--pairs", "q", "--out_dir", "o",
         "--explore", str(RECIPES / "explore" / f"{dataset}.yaml")]))
    assert (sampling.backend, sampling.n, exploring.explore.k) == ("vllm", 100, 4)
    assert exploring.explore.max_new_tokens == sampling.max_new_tokens  # set by the file (the default is None)


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_pipeline_recipe_trains_with_a_tiny_model(recipe: Path, tiny_arith_model: Path, tmp_path: Path) -> None:
    """The recipe's own stage settings (QLoRA or full weights, accumulation, loss on the prompt) through
    the pipeline's SFT and DPO stages, on one CPU process."""
    dataset = recipe.stem.split("-")[0]
    lora = ["--pipeline.model.lora.r", "4"] if "-qlora" in recipe.stem else []
    config = _pipeline_config(
        recipe, "--pipeline.run_dir", str(tmp_path / "run"), "--pipeline.data_dir", str(_data_dir(tmp_path, dataset)),
        "--pipeline.model.path", str(tiny_arith_model), "--pipeline.model.dtype", "float32", *lora,
        "--pipeline.trainer.accelerator", "cpu", "--pipeline.trainer.devices", "1",
        "--pipeline.trainer.strategy", "auto", "--pipeline.trainer.precision", "32-true",
        "--pipeline.trainer.enable_progress_bar", "false",
        "--pipeline.sft.epochs", "1", "--pipeline.sft.max_length", "96",
        "--pipeline.dpo.epochs", "1", "--pipeline.dpo.max_length", "96", "--pipeline.dpo.max_prompt_length", "48",
        "--pipeline.sampling.backend", "hf", "--pipeline.sampling.dtype", "auto",
        "--pipeline.eval_limit", "2", "--pipeline.eval_max_new_tokens", "4")
    run = Pipeline(config).setup()
    sft = run.train_sft("round_0/sft", str(tiny_arith_model), config.sft)
    pairs = _pairs(tmp_path / "run" / "round_1" / "pairs.jsonl")
    run.evaluate("round_1/outcome_dpo", run.train_dpo("round_1/outcome_dpo", init=sft, reference=sft, pairs=pairs))
    assert (tmp_path / "run" / "round_1" / "outcome_dpo" / "policy" / "config.json").is_file()
    assert run.state.done("round_1/outcome_dpo/eval")
