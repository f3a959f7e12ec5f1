"""bench/gpu_check.py without a GPU: the dry run names what needs CUDA, the smoke mode reports every figure,
a recipe that needs a missing package is a skipped line naming it, and the recipe runner (the path the GPU
takes, on the CPU here) runs recipes as written in one worker process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

import pytest
from recipe_configs import ALLOWED, ALLOWED_KEYS, FSDP_STAGES, PIPELINES, QLORA_STAGES

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_mfu_and_peak_table(gpu_check: ModuleType) -> None:
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.bf16_peak_tflops("cpu") is None
    # 7B params at 10k tokens/s: 6 * 7e9 * 1e4 = 4.2e14 FLOP/s of a 989 TFLOP/s peak
    assert gpu_check.mfu(7_000_000_000, 10_000.0, 989.0) == pytest.approx(0.4247, abs=1e-4)
    assert gpu_check.mfu(1, 1.0, None) is None


def test_quickstart_config_builds_for_the_gpu(gpu_check: ModuleType, tmp_path: Path) -> None:
    args = argparse.Namespace(accelerator="gpu", precision="bf16-mixed")
    config = gpu_check.quickstart_config(tmp_path / "run", args)
    assert config.trainer.precision == "bf16-mixed" and config.trainer.accelerator == "gpu"
    assert config.sampling.backend == "hf" and config.rounds == 2


def test_the_recipes_are_the_test_matrix(gpu_check: ModuleType) -> None:
    assert gpu_check.matrix() == [*FSDP_STAGES, *QLORA_STAGES, *PIPELINES]
    assert gpu_check.recipe_needs("gsm8k-mistral7b-dpo-fsdp") == []
    assert gpu_check.recipe_needs("math-llemma7b-sft-qlora") == ["bitsandbytes"]
    assert gpu_check.recipe_needs("math-mistral7b-pipeline-qlora") == ["bitsandbytes", "vllm"]


def test_cpu_dry_run_names_every_check_that_needs_cuda(gpu_check: ModuleType, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No GPU, no --smoke: one skipped line per check and per recipe, nothing built, exit without error."""
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    gpu_check.main(["--work", str(tmp_path)])
    lines = _lines(capsys.readouterr().out)
    assert list(tmp_path.iterdir()) == []  # no model, no fit
    checks = [line for line in lines if line["figure"] not in ("env", "done")]
    assert {line["figure"] for line in checks} == {*gpu_check.CUDA_CHECKS, "recipe", "pipeline"}
    assert [line["recipe"] for line in checks if line["figure"] == "recipe"] == gpu_check.matrix()
    for line in checks:
        assert "cuda" in line["needs"] and "needs a CUDA device" in line["skipped"], line
    assert lines[-1]["figure"] == "done"


def test_a_missing_package_is_a_skipped_recipe_line_naming_it(gpu_check: ModuleType, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU machine of issue 27 (no bitsandbytes, no vllm): QLoRA and pipeline recipes are skipped with the
    package and how to install it; the FSDP ones would run (here: the worker is not started)."""
    absent = ("bitsandbytes", "vllm")
    monkeypatch.setattr(gpu_check, "missing_packages", lambda names: [n for n in names if n in absent])
    run, skipped = gpu_check.plan_recipes(gpu_check.matrix(), "gpu")
    assert run == FSDP_STAGES
    by_name = {line["recipe"]: line for line in skipped}
    assert set(by_name) == {*QLORA_STAGES, *PIPELINES}
    for name in QLORA_STAGES:
        reason = by_name[name]["skipped"]
        assert reason.startswith("bitsandbytes is not installed") and "needs a CUDA device" not in reason
    for name in PIPELINES:
        reason = by_name[name]["skipped"]
        assert "bitsandbytes is not installed" in reason
        assert "vllm is not installed" in reason and "pip install -e '.[vllm]'" in reason
    lines = gpu_check.recipe_checks(QLORA_STAGES[:1], "gpu", tmp_path)
    assert lines == [by_name[QLORA_STAGES[0]]] and _lines(capsys.readouterr().out) == lines
    assert not (tmp_path / "recipes").exists()


def test_smoke_mode_reports_every_figure_on_cpu(gpu_check: ModuleType, tmp_path: Path, capsys,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    gpu_check.main(["--smoke", "--work", str(tmp_path)])
    lines = _lines(capsys.readouterr().out)
    figures = {line["figure"] for line in lines}
    assert figures >= {"env", *gpu_check.CUDA_CHECKS, "recipe", "pipeline", "done"}
    by_figure = {line["figure"]: line for line in lines}
    assert by_figure["sft_tokens_per_sec"]["value"] > 0 and by_figure["dpo_tokens_per_sec"]["value"] > 0
    where = [line["where"] for line in lines if line["figure"] == "free_before_engine"]
    assert len(where) == 2 and all("module and trainer dropped" in w for w in where)
    for name in ("sft_mfu", "dpo_peak_memory", "free_before_engine", "recipe", "pipeline"):
        assert by_figure[name]["skipped"], name  # a reason, not a silent gap


@pytest.mark.recipe_as_written
def test_recipes_run_as_written_in_one_worker(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The GPU's path on the CPU: FSDP2 (ModelParallelStrategy on 1 device, twice in one process) and QLoRA
    recipes in bf16-mixed through the CLI, only allowed keys changed; a DPO fit's step-0 loss is log 2."""
    names = ["math-mistral7b-dpo-fsdp", "gsm8k-llemma7b-sft-fsdp", "gsm8k-deepseekmath7b-dpo-qlora"]
    lines = {line["recipe"]: line for line in gpu_check.recipe_checks(names, "cpu", tmp_path, timeout=300)}
    assert set(lines) == set(names)
    for name, line in lines.items():
        assert line["ok"], line
        assert ALLOWED["devices"] & set(line["changed_keys"]) == (
            {"trainer.devices", "trainer.strategy.init_args.data_parallel_size"} if "fsdp" in name else set())
        assert set(line["changed_keys"]) <= ALLOWED_KEYS and line["merged"], line
    for name in ("math-mistral7b-dpo-fsdp", "gsm8k-deepseekmath7b-dpo-qlora"):
        assert lines[name]["step0_ok"] and lines[name]["step0_autocast"] and lines[name]["step0_fits"] == 1
        assert lines[name]["step0_max_abs_loss_minus_log2"] < 1e-4 < math.log(2)
    assert lines["math-mistral7b-dpo-fsdp"]["export_architectures"] == ["MistralForCausalLM"]
    assert lines["gsm8k-llemma7b-sft-fsdp"]["export_architectures"] == ["LlamaForCausalLM"]


def test_a_recipe_changed_outside_the_allowed_keys_is_an_error_line(gpu_check: ModuleType, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run config that drifts from the recipe beyond the allowed keys is refused before anything runs."""
    import recipe_configs

    def broken(name: str, model: str, accelerator: str, devices: int) -> dict:
        config = recipe_configs.recipe(name)
        config["trainer"]["accelerator"] = accelerator
        config["trainer"]["no_such_option"] = 1
        return config

    monkeypatch.setattr(recipe_configs, "stage_run_config", broken)
    line = gpu_check.run_recipe("gsm8k-llemma7b-sft-fsdp", "cpu", tmp_path)
    assert line["ok"] is False and "trainer.no_such_option" in line["changed_keys"]
    assert "outside the allowed set" in line["error"] and "trainer.no_such_option" in line["error"]
    assert Path.cwd() != tmp_path / "gsm8k-llemma7b-sft-fsdp"  # the working directory is restored
