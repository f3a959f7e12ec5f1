"""GPU recipes parse, and each runs one step on CPU with the 7B model swapped for a tiny one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from selfexplore.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))


def _gsm8k_dir(tmp_path: Path) -> Path:
    data = tmp_path / "gsm8k"
    data.mkdir()
    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
             "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
            for i in range(1, 17)]
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _pairs(tmp_path: Path) -> Path:
    path = tmp_path / "gpairs.jsonl"
    rows = [{"prompt": f"Tom has {i} apples and buys 2 more.\n", "chosen": f"{i} + 2 = {i + 2}\nThe answer is {i + 2}",
             "rejected": f"{i} + 2 = {i + 3}\nThe answer is {i + 3}"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_recipe_is_found() -> None:
    names = {p.stem for p in RECIPES}
    assert {"gsm8k-mistral7b-sft-qlora", "gsm8k-mistral7b-sft-fsdp",
            "gsm8k-mistral7b-dpo-qlora", "gsm8k-mistral7b-dpo-fsdp"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_one_step_with_a_tiny_model(recipe: Path, tiny_arith_model: Path, tmp_path: Path) -> None:
    config = yaml.safe_load(recipe.read_text())
    init = config["model"]["init_args"]
    assert config["trainer"]["accelerator"] == "gpu"  # the recipe itself targets GPUs
    overrides = [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
        "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false",
        "--model.init_args.model.path", str(tiny_arith_model), "--model.init_args.model.dtype", "float32",
        "--model.init_args.export_dir", str(tmp_path / "policy"),
    ]
    if "lora" in init["model"]:
        overrides += ["--model.init_args.model.lora.r", "4"]
    if "data_dir" in config["data"]["init_args"]:
        overrides += ["--data.init_args.data_dir", str(_gsm8k_dir(tmp_path)),
                      "--data.init_args.max_length", "96"]
    else:
        overrides += ["--data.init_args.train_path", str(_pairs(tmp_path)),
                      "--data.init_args.max_length", "96", "--data.init_args.max_prompt_length", "48"]
    main(["fit", "--config", str(recipe), *overrides])
    assert (tmp_path / "policy" / "config.json").is_file()
