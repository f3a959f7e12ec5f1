"""The one-command pipeline with 2 processes on CPU (gloo): each unit once, shared by the ranks.

The test runs this file as the command: Lightning reruns the command once per extra rank, so
the scripted sampler of `test_pipeline` installed by `_rank_main` reaches every rank (a pytest
monkeypatch would not leave the test process). Each rank prints a tagged line whenever it builds
a sampler and before every Self-Explore fit, so the test can see who sampled and what each rank
trained on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import selfexplore.pipeline.state as state_module
from selfexplore.pipeline.state import ATTEMPT_VARIABLE, RankZeroFailed, RunState
from selfexplore.ranks import RANK_VARIABLES, is_rank_zero

TAG = "PIPELINE_RANK_EVENT "


def _event(**fields: object) -> None:
    """One tagged line in a single write, so the two ranks' lines on the shared pipe never interleave."""
    line = TAG + json.dumps({"rank": int(os.environ.get("LOCAL_RANK", "0")), **fields}) + "\n"
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())


def _rank_main() -> None:
    """What every rank runs: the `selfexplore` CLI with the scripted sampler, reporting events."""
    from test_pipeline import ScriptedSampler

    import selfexplore.pipeline.run as pipeline_run
    from selfexplore.cli import main

    def get_sampler(config: object, policy: str, **kwargs: object) -> ScriptedSampler:
        _event(event="sampler", policy=policy)
        return ScriptedSampler(policy)

    fit = pipeline_run.Pipeline._fit

    def spy(self, module, data, out_dir, stage):
        if Path(out_dir).name == "self_explore":
            _event(event="self_explore_fit", train_path=data.train_path, reference=module.reference_path)
        return fit(self, module, data, out_dir, stage)

    pipeline_run.get_sampler = get_sampler
    pipeline_run.Pipeline._fit = spy
    main(sys.argv[1:])


@pytest.fixture(autouse=True)
def _restore_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 exports its attempt id to the environment; keep it from leaking out of a test."""
    monkeypatch.setenv(ATTEMPT_VARIABLE, "")


def _events(stdout: str) -> list[dict]:
    return [json.loads(line[len(TAG):]) for line in stdout.splitlines() if line.startswith(TAG)]


@pytest.mark.parametrize(("env", "expected"), [({}, True), ({"LOCAL_RANK": "0", "NODE_RANK": "0"}, True),
                                                 ({"LOCAL_RANK": "1"}, False), ({"RANK": "3"}, False),
                                                 ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False)])
def test_rank_zero_is_read_from_launcher_variables(monkeypatch, env, expected) -> None:
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_rank_zero() is expected


def test_waiting_rank_raises_on_rank_zero_failure_and_never_writes(tmp_path: Path) -> None:
    writer = RunState(tmp_path, {"a": 1})
    writer.complete("base", {"policy": "p"})
    saved = (tmp_path / "state.json").read_text()
    reader = RunState(tmp_path, {"a": 1}, writer=False)  # a rank Lightning launched: it inherits the attempt
    assert (tmp_path / "state.json").read_text() == saved
    assert reader.wait_for("base") == {"policy": "p"}
    with pytest.raises(RuntimeError, match="only rank 0"):
        reader.complete("sft")
    writer.fail("round_0/sft/eval", ValueError("no GPU memory"))
    with pytest.raises(RankZeroFailed, match=r"round_0/sft/eval.*ValueError: no GPU memory"):
        reader.wait_for("round_0/sft/eval")


def test_failure_of_a_previous_attempt_does_not_stop_a_waiting_rank(tmp_path: Path, monkeypatch) -> None:
    RunState(tmp_path, {"a": 1}).fail("explore", ValueError("old"))
    monkeypatch.delenv(ATTEMPT_VARIABLE)  # started by another launcher (torchrun) before rank 0 restarted
    reader = RunState(tmp_path, {"a": 1}, writer=False)
    threading.Timer(0.3, lambda: RunState(tmp_path, {"a": 1}).complete("explore", {"pairs": 3})).start()
    assert reader.wait_for("explore") == {"pairs": 3}


def test_waiting_rank_raises_when_its_launcher_exits(tmp_path: Path, monkeypatch) -> None:
    RunState(tmp_path, {"a": 1})
    reader = RunState(tmp_path, {"a": 1}, writer=False)
    monkeypatch.setattr(state_module.os, "getppid", lambda: -1)
    with pytest.raises(RankZeroFailed, match="launching process"):
        reader.wait_for("explore")


@pytest.mark.parametrize(("strategy", "devices", "match"), [("ddp_spawn", 2, "starts its processes inside each fit"),
                                                            ("fsdp2", "auto", "needs trainer.devices as a number")])
def test_strategies_the_pipeline_cannot_run_are_refused(tmp_path: Path, strategy, devices, match) -> None:
    from test_pipeline import _config

    from selfexplore.pipeline.config import TrainerConfig

    trainer = TrainerConfig(accelerator="cpu", devices=devices, strategy=strategy, enable_progress_bar=False)
    with pytest.raises(ValueError, match=match):  # when the config is read, before anything is written
        _config(tmp_path / "run", trainer=trainer)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_process_pipeline_runs_each_unit_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  strategy: str) -> None:
    from test_pipeline import ARTIFACTS, ScriptedSampler, _config, _read

    import selfexplore.pipeline.run as pipeline_run
    from selfexplore.explore.config import ExploreConfig
    from selfexplore.pipeline.config import TrainerConfig
    from selfexplore.sampling.base import SamplingConfig

    # Small shards and chunks, so both ranks get work in every data-parallel unit.
    shards = {"sampling": SamplingConfig(n=4, max_new_tokens=48, shard_size=3),
              "explore": ExploreConfig(k=2, max_new_tokens=48, chunk_size=3)}
    monkeypatch.setattr(pipeline_run, "get_sampler", lambda config, policy, **kw: ScriptedSampler(policy))
    pipeline_run.run_pipeline(_config(tmp_path / "single", **shards))
    expected_units = set(json.loads((tmp_path / "single" / "state.json").read_text())["units"])

    run = tmp_path / "run"
    trainer = TrainerConfig(accelerator="cpu", devices=2, strategy=strategy, enable_progress_bar=False)
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"pipeline": asdict(_config(run, trainer=trainer, **shards))}))
    out = subprocess.run([sys.executable, __file__, "pipeline", "--config", str(config)], check=False,
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]

    state = json.loads((run / "state.json").read_text())
    assert set(state["units"]) == expected_units and "failed" not in state
    assert _read(run) == _read(tmp_path / "single"), "artifacts differ from the single-process run"
    for name in ARTIFACTS:
        lines = (run / name).read_text().splitlines()
        assert len(lines) == len(set(lines)), f"{name} has duplicated lines"
    events = _events(out.stdout)
    assert {e["rank"] for e in events if e["event"] == "sampler"} == {0, 1}, "every rank samples"
    # Lightning starts rank 1 at the first fit: units before it are rank 0's alone, every later
    # sample / explore / eval unit is shared, and each rank wrote only the shards it owns.
    metas = [(int(p.name.split(".")[0].rsplit("_", 1)[-1]), json.loads(p.read_text())["rank"])
             for p in run.rglob("*.meta.json")]
    assert {rank for _, rank in metas} == {0, 1}
    assert all(rank == 0 or index % 2 == 1 for index, rank in metas)
    rft, explored = str(run / "round_1/rft/policy"), str(run / "round_{}/explore/gpairs.jsonl")
    for rank in (0, 1):
        fits = [(e["train_path"], e["reference"])
                for e in events if e["event"] == "self_explore_fit" and e["rank"] == rank]
        assert fits == [(explored.format(1), rft), (explored.format(2), rft)], rank
    assert out.stdout.count("| Self-Explore | 2 |") == 1, "the report is printed by rank 0 only"
    assert (run / "report.md").is_file()
    # exports hold whole tensors (FSDP2 shards gathered) and every round trained its starting policy
    shapes = {k: v.shape for k, v in load_file(run / "base" / "model.safetensors").items()}
    previous = load_file(run / "round_1/rft/policy/model.safetensors")
    for r in (1, 2):
        policy = load_file(run / f"round_{r}/self_explore/policy/model.safetensors")
        assert {k: v.shape for k, v in policy.items()} == shapes
        assert all(v.isfinite().all() for v in policy.values())
        assert any(not torch.equal(v, previous[k]) for k, v in policy.items()), f"round {r} changed nothing"
        previous = policy


if __name__ == "__main__":
    _rank_main()
