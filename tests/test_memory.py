"""Memory handoff between training and engines: release before every engine start, 'auto' sizing."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from selfexplore.memory import GIB, auto_memory_utilization
from selfexplore.models import load_tokenizer
from selfexplore.sampling.base import SamplingConfig
from selfexplore.sampling.factory import get_sampler


def test_auto_utilization_is_the_free_share_less_headroom() -> None:
    assert auto_memory_utilization(free=60 * GIB, total=80 * GIB) == 0.7  # 0.75 - 0.05
    assert auto_memory_utilization(free=80 * GIB, total=80 * GIB, headroom=0.1) == 0.9
    with pytest.raises(RuntimeError, match=r"only 4\.0 of 80\.0 GiB are free"):
        auto_memory_utilization(free=4 * GIB, total=80 * GIB)
    with pytest.raises(ValueError, match="0 <= free <= total"):
        auto_memory_utilization(free=2, total=1)
    assert SamplingConfig(gpu_memory_utilization=1.5).problems() == [
        "sampling.gpu_memory_utilization must be 'auto' or in (0, 1], got 1.5"]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A CUDA device with 30 of 80 GiB free whose cache emptying is recorded in the returned list."""
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * GIB, 80 * GIB))
    return events


def _fake_vllm(tokenizer, events: list[str]) -> dict[str, object]:
    """Just enough of the vllm package for VLLMSampler to start an engine; starts are recorded."""
    class LLM:
        def __init__(self, model: str, gpu_memory_utilization: float, **kwargs: object) -> None:
            events.append(f"engine gpu_memory_utilization={gpu_memory_utilization}")
            self.llm_engine = SimpleNamespace(model_config=SimpleNamespace(max_model_len=256))

        def get_tokenizer(self):
            return tokenizer

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.TokensPrompt = LLM, dict, dict
    vllm.envs = SimpleNamespace(VLLM_ENABLE_V1_MULTIPROCESSING=True)
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = object
    return {"vllm": vllm, "vllm.envs": vllm.envs, "vllm.lora": lora, "vllm.lora.request": request}


def test_memory_is_released_before_every_engine_start(tiny_arith_model: Path, fake_cuda: list[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for name, module in _fake_vllm(load_tokenizer(str(tiny_arith_model)), fake_cuda).items():
        monkeypatch.setitem(sys.modules, name, module)
    from selfexplore.sampling import hf

    monkeypatch.setattr(hf.HFSampler, "from_pretrained", classmethod(lambda cls, *a, **k: fake_cuda.append("hf")))
    auto = SamplingConfig(backend="vllm", gpu_memory_utilization="auto")
    get_sampler(auto, str(tiny_arith_model))
    get_sampler(SamplingConfig(backend="vllm", gpu_memory_utilization=0.4), str(tiny_arith_model))
    get_sampler(SamplingConfig(backend="hf"), str(tiny_arith_model))
    assert fake_cuda == ["empty_cache", "engine gpu_memory_utilization=0.325",  # 30/80 - 0.05
                         "empty_cache", "engine gpu_memory_utilization=0.4",
                         "empty_cache", "hf"]

