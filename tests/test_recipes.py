"""GPU recipes: every file runs on CPU with the 7B model swapped for a tiny one, and the family agrees.

`configs/recipes/` holds, for each dataset x model cell, SFT and step-DPO LightningCLI configs
for QLoRA on one GPU and FSDP2 on 8 GPUs, and shared `sampling/<dataset>.yaml` and
`explore/<dataset>.yaml` blocks for the stage commands. The files are
complete on their own, so the consistency tests below are what keeps them one family: recipes
of a kind differ only along their dataset / model axes, QLoRA and FSDP agree on everything but
the learning rate (QLoRA: 20x).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonargparse import ArgumentParser, capture_parser

from selfexplore.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
DATASETS = ("gsm8k", "math")
MODELS = ("mistral7b", "llemma7b", "deepseekmath7b")
STRATEGIES = ("qlora", "fsdp")
CELLS = [(d, m) for d in DATASETS for m in MODELS]
STAGE_RECIPES = [RECIPES / f"{d}-{m}-{stage}-{s}.yaml" for d, m in CELLS for stage in ("sft", "dpo") for s in STRATEGIES]
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


def _effective_batch(config: dict[str, Any]) -> int:
    trainer = config["trainer"]
    return trainer["devices"] * trainer.get("accumulate_grad_batches", 1) * config["data"]["init_args"]["batch_size"]


def _stage_parser(command: str) -> ArgumentParser:
    """The parser `selfexplore <command>` builds, without running the command."""
    return capture_parser(lambda: main([command]))


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
    expected = {p.name for p in STAGE_RECIPES}
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


@pytest.mark.parametrize("dataset", DATASETS)
def test_shared_blocks_parse_for_the_stage_commands(dataset: str) -> None:
    sample = _stage_parser("sample")
    sampling = sample.instantiate_classes(sample.parse_args(
        ["--policy", "p", "--out", "o", "--sampling", str(RECIPES / "sampling" / f"{dataset}.yaml")])).sampling
    explore = _stage_parser("explore")
    explore_config = explore.instantiate_classes(explore.parse_args(
        ["--explorer", "p", "--pairs", "q", "--out_dir", "o", "--config", str(RECIPES / "explore" / f"{dataset}.yaml")])).config
    assert (sampling.backend, sampling.n, explore_config.k) == ("vllm", 100, 4)
