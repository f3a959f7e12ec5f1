"""The recipe runs of tests/test_recipes_as_written.py and bench/gpu_check.py, without pytest.

A recipe is run as written but for the keys in ALLOWED (the model, the accelerator, the device
count, the data and the sizes): `stage_run_config` / `pipeline_run_config` make those changes for
a tiny run, `changed_keys` proves nothing else moved, `prepare` writes the tiny data and the tiny
model of the recipe model's family (`real_tokenizers`) where the run config expects them, and
`step0_rows` reads what `recipe_worker.record_step0` wrote. bench/gpu_check.py imports this
module on GPU machines that have no pytest, so it must not import it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from real_tokenizers import build_family_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"

# The keys a CPU run may change, by why (issue 27): everything else must stay as the recipe file says.
ALLOWED = {
    "model": {"model.init_args.model.path", "pipeline.model.path"},
    "accelerator": {"trainer.accelerator", "pipeline.trainer.accelerator"},
    "devices": {"trainer.devices", "trainer.strategy.init_args.data_parallel_size", "pipeline.trainer.devices"},
    "data": {"data.init_args.data_dir", "data.init_args.train_path", "pipeline.data_dir"},
    "sizes": {"trainer.max_epochs", "trainer.max_steps", "data.init_args.batch_size", "data.init_args.eval_batch_size",
              "data.init_args.max_length", "data.init_args.max_prompt_length", "data.init_args.val_limit",
              "model.init_args.eval_max_new_tokens",
              *(f"pipeline.{stage}.{key}" for stage in ("sft", "rft", "dpo")
                for key in ("epochs", "batch_size", "max_length", "max_prompt_length")),
              "pipeline.train_questions", "pipeline.eval_limit", "pipeline.eval_max_new_tokens",
              "pipeline.sampling.n", "pipeline.sampling.max_new_tokens",
              "pipeline.explore.k", "pipeline.explore.max_new_tokens", "pipeline.explore.max_steps"},
}
ALLOWED_KEYS = set().union(*ALLOWED.values())
# bf16 autocast rounds the policy's and the reference's log-probs alike when both come from the same
# precision and masking; what is left is summation order: |loss - log 2| and |margin| within these.
STEP0_LOSS_TOLERANCE = 1e-4
STEP0_MARGIN_TOLERANCE = 1e-4
TASK_ROWS = 16


# ----- configs ---------------------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for key, value in d.items():
            yield from _flatten(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], d


def changed_keys(recipe: dict[str, Any], run: dict[str, Any]) -> set[str]:
    """Flattened keys whose value differs between the recipe and the config that runs (added or removed too)."""
    a, b = dict(_flatten(recipe)), dict(_flatten(run))
    return {k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>")}


def recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def with_blocks(config: dict[str, Any]) -> dict[str, Any]:
    """A pipeline recipe with its `sampling:` / `explore:` files inlined (what the run reads)."""
    out = copy.deepcopy(config)
    for block in ("sampling", "explore"):
        if isinstance(out["pipeline"].get(block), str):
            out["pipeline"][block] = yaml.safe_load((RECIPES / out["pipeline"][block]).read_text())
    return out


def stage_run_config(name: str, model: str, accelerator: str = "cpu", devices: int = 2) -> dict[str, Any]:
    """A `fit` recipe with only allowed keys changed for a tiny run (relative paths stay: cwd is the work dir):
    on `accelerator`, a multi-device recipe on `devices` (CPU: 2 gloo processes; one GPU: 1)."""
    config = copy.deepcopy(recipe(name))
    trainer, init, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer["accelerator"] = accelerator
    if trainer["devices"] > 1:  # FSDP2 over 8 GPUs -> `devices` processes
        trainer["devices"] = devices
        trainer["strategy"]["init_args"]["data_parallel_size"] = devices
    trainer.update(max_epochs=1, max_steps=1)
    if "path" in init["model"] and not init["model"]["path"].startswith("runs/"):
        init["model"]["path"] = model  # a hub id; a runs/ path gets the tiny model built there
    data.update(batch_size=2, max_length=96)
    if "max_prompt_length" in data:
        data["max_prompt_length"] = 64
    if "val_limit" in data:
        data.update(val_limit=2, eval_batch_size=2)
    if "eval_max_new_tokens" in init:
        init["eval_max_new_tokens"] = 6
    return config


def pipeline_run_config(name: str, model: str, accelerator: str = "cpu", devices: int = 2) -> dict[str, Any]:
    """A pipeline recipe (its sampling/explore files inlined) with only allowed keys changed for a tiny run."""
    config = with_blocks(recipe(name))
    p = config["pipeline"]
    p["model"]["path"] = model
    p["trainer"]["accelerator"] = accelerator
    if p["trainer"]["devices"] > 1:
        p["trainer"]["devices"] = devices
    for stage in ("sft", "dpo"):  # (rft is the same mapping as sft in the recipe: a YAML alias)
        p[stage].update(epochs=1, batch_size=2, max_length=128)
    p["dpo"]["max_prompt_length"] = 96
    p.update(train_questions=4, eval_limit=2, eval_max_new_tokens=24)
    p["sampling"].update(n=4, max_new_tokens=24)
    p["explore"].update(k=2, max_new_tokens=24, max_steps=3)
    return config


# ----- tiny data and models --------------------------------------------------------------------
def task_rows(task: str) -> list[dict[str, str]]:
    """Train/validation/test rows in the task's original layout (GSM8K `#### N`, MATH `\\boxed{}`)."""
    if task == "gsm8k":
        return [{"question": f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?",
                 "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
                for i in range(1, TASK_ROWS + 1)]
    return [{"problem": f"Compute ${i} + {i + 2}$.",
             "solution": f"We add the two numbers.\n${i} + {i + 2} = {2 * i + 2}$.\n"
             f"So the sum is $\\boxed{{{2 * i + 2}}}$."} for i in range(1, TASK_ROWS + 1)]


def write_task_data(root: Path, task: str) -> Path:
    data = root / "data" / task
    data.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in task_rows(task)))
    return data


def corpus(task: str) -> list[str]:
    from selfexplore.tasks import get_task

    t = get_task(task)
    train = write_task_data(Path("."), task) / "train.jsonl"
    return [t.prompt(p) + p.solution for p in t.load("train", path=str(train))]


def write_pairs(path: Path, task: str) -> None:
    """Step-level pairs of the task's prompt format: the right next step against a slipped one."""
    from selfexplore.tasks import get_task

    t = get_task(task)
    rows = []
    for p in t.load("train", path=f"data/{task}/train.jsonl")[:8]:
        steps = t.split_steps(p.solution)
        prompt = t.prompt(p) + "".join(s + "\n" for s in steps[:-1])
        slipped = steps[-1].replace(str(p.answer), f"{p.answer}1")
        rows.append({"prompt": prompt, "chosen": steps[-1], "rejected": slipped})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def prepare(name: str, config: dict[str, Any]) -> None:
    """Data, pairs and models where the (cwd-relative) run config expects them."""
    task, model_name = name.split("-")[:2]
    write_task_data(Path("."), task)
    texts = corpus(task)
    if "pipeline" in config:
        model_path = Path(config["pipeline"]["model"]["path"])
    else:
        model_path = Path(config["model"]["init_args"]["model"]["path"])
    if not model_path.exists():
        build_family_model(model_name, texts, model_path)
    train_path = config.get("data", {}).get("init_args", {}).get("train_path")
    if train_path:
        write_pairs(Path(train_path), task)


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path

def step0_rows(out: Path) -> list[dict[str, Any]]:
    """Every fit's first DPO loss as `recipe_worker.record_step0` wrote it under `out` (all ranks)."""
    return [json.loads(line) for f in sorted(out.glob("step0-rank*.jsonl")) for line in f.read_text().splitlines()]


# ----- the matrix --------------------------------------------------------------------------------
# QLoRA stage recipes, in this process: both tasks x both families (Llama through Llemma or
# DeepSeek-Math conventions, Mistral with its sliding window) for SFT and for DPO.
QLORA_STAGES = ["gsm8k-llemma7b-sft-qlora", "math-mistral7b-sft-qlora", "gsm8k-mistral7b-sft-qlora",
                "math-deepseekmath7b-sft-qlora",
                "gsm8k-mistral7b-dpo-qlora", "math-llemma7b-dpo-qlora", "gsm8k-deepseekmath7b-dpo-qlora",
                "math-mistral7b-dpo-qlora"]
# FSDP2 stage recipes, all in one pair of gloo processes.
FSDP_STAGES = ["math-llemma7b-sft-fsdp", "gsm8k-mistral7b-sft-fsdp", "gsm8k-deepseekmath7b-dpo-fsdp",
               "math-mistral7b-dpo-fsdp"]
# Pipeline recipes with vLLM sampling (one process: vLLM's CPU engine runs in-process).
PIPELINES = ["gsm8k-llemma7b-pipeline-qlora", "math-mistral7b-pipeline-qlora"]


def tiny_model_path(name: str) -> str:
    return f"models/{name.split('-')[1]}-tiny"

