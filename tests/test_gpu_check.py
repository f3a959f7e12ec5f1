"""bench/gpu_check.py in its CPU smoke mode: every figure reported, GPU-only ones skipped with a reason."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mfu_and_peak_table(gpu_check) -> None:
    assert gpu_check.bf16_peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.bf16_peak_tflops("cpu") is None
    # 7B params at 10k tokens/s: 6 * 7e9 * 1e4 = 4.2e14 FLOP/s of a 989 TFLOP/s peak
    assert gpu_check.mfu(7_000_000_000, 10_000.0, 989.0) == pytest.approx(0.4247, abs=1e-4)
    assert gpu_check.mfu(1, 1.0, None) is None


def test_quickstart_config_builds_for_the_gpu(gpu_check, tmp_path: Path) -> None:
    config = gpu_check.quickstart_config(tmp_path / "run", argparse.Namespace(accelerator="gpu", precision="bf16-mixed"))
    assert config.trainer.precision == "bf16-mixed" and config.trainer.accelerator == "gpu"
    assert config.sampling.backend == "hf" and config.rounds == 2


def test_smoke_mode_reports_every_figure_on_cpu(gpu_check, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    gpu_check.main(["--smoke", "--work", str(tmp_path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    figures = {line["figure"] for line in lines}
    assert figures >= {"env", "sft_tokens_per_sec", "sft_mfu", "sft_peak_memory", "sampling_tokens_per_sec",
                       "dpo_tokens_per_sec", "dpo_mfu", "dpo_peak_memory", "free_before_engine", "pipeline"}
    by_figure = {line["figure"]: line for line in lines}
    assert by_figure["sft_tokens_per_sec"]["value"] > 0 and by_figure["dpo_tokens_per_sec"]["value"] > 0
    for name in ("sft_mfu", "dpo_peak_memory", "free_before_engine", "pipeline"):
        assert by_figure[name]["skipped"], name  # a reason, not a silent gap
