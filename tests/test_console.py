"""What a person sees: the root help, light commands, the pipeline's console, `status`, loggers."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml
from test_pipeline import _config, scripted  # noqa: F401 (a fixture)

from selfexplore.cli import LIGHTNING_SUBCOMMANDS, STAGE_COMMANDS, SelfExploreCLI, main
from selfexplore.pipeline.config import TrainerConfig
from selfexplore.pipeline.plan import planned_units
from selfexplore.pipeline.run import run_pipeline
from selfexplore.pipeline.status import render_status
from selfexplore.sampling.base import SamplerBase

TESTS = Path(__file__).parent
COMMANDS = ("pipeline", "status", "sample", "pairs", "explore", "prm-data", "fit", "validate", "test")
BANNERS = ("GPU available", "Seed set", "Tip:", "Loading weights", "logging interval")


def test_root_help_lists_every_command_with_a_line_and_no_predict(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command
    assert "predict" not in out
    assert set(SelfExploreCLI.subcommands()) == set(LIGHTNING_SUBCOMMANDS) == {"fit", "validate", "test"}
    assert set(STAGE_COMMANDS) | set(LIGHTNING_SUBCOMMANDS) == set(COMMANDS)
    with pytest.raises(SystemExit) as exit_:
        main(["predict"])
    assert exit_.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bare call shows the same list
        main([])
    err = capsys.readouterr().err
    assert all(command in err for command in COMMANDS)


def _fake_run(run_dir: Path, units: dict, **state) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"rounds": 1, "baselines": []}))
    (run_dir / "state.json").write_text(json.dumps({"config_sha256": "x", "units": units, **state}))
    return run_dir


def test_help_version_and_status_import_neither_bitsandbytes_nor_vllm(tmp_path: Path) -> None:
    run = _fake_run(tmp_path / "run", {"base": {"seconds": 0.1}})
    script = textwrap.dedent(f"""
        import contextlib, io, sys
        from selfexplore.cli import main
        for args in (["--help"], ["--version"], ["status", {str(run)!r}]):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                main(args)
            print(out.getvalue().splitlines()[0])
        print("HEAVY", sorted(m for m in ("bitsandbytes", "vllm", "peft") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    lines = out.stdout.splitlines()
    assert lines[1] == f"selfexplore {version('selfexplore')}"
    assert lines[2].startswith(f"{run}: 11 units: 1 done, 10 to do")
    assert lines[-1] == "HEAVY []"
    assert "gemm_4bit" not in out.stderr


def _yaml(run_dir: Path, path: Path, **overrides) -> Path:
    config = asdict(_config(run_dir, **overrides))
    path.write_text(yaml.safe_dump({"pipeline": config}))
    return path


def test_console_shows_the_plan_unit_by_unit_and_keeps_library_banners_in_the_log(scripted, tmp_path, capfd):
    run = tmp_path / "run"
    main(["pipeline", "--config", str(_yaml(run, tmp_path / "c.yaml"))])
    out, err = capfd.readouterr()
    plan = planned_units(2, ["outcome_dpo", "self_explore"])
    headers = re.findall(r"^\[\s*(\d+)/(\d+)\] (.+)$", out, re.M)
    assert [int(i) for i, _, _ in headers] == list(range(1, len(plan) + 1))
    assert {n for _, n, _ in headers} == {str(len(plan))}
    assert "round 1 · first-pit exploration · " in out and "rejected rationales, k=2" in out
    closing = re.findall(r"^\s+done in [\d.]+ s(.*)$", out, re.M)
    assert len(closing) == len(plan) and sum("accuracy" in c for c in closing) == 5
    assert "| Self-Explore | 2 |" in out  # and the report table at the end
    assert not [b for b in BANNERS if b in out + err]
    log = (run / "pipeline.log").read_text()
    assert "GPU available" in log and "[ 1/21] base model" in log
    # the plan is what the run does: units complete in exactly that order
    units = json.loads((run / "state.json").read_text())["units"]
    assert [u for u in units if u in plan] == plan
    status = render_status(run)
    assert status.splitlines()[0].startswith(f"{run}: 21 units: 21 done")
    assert re.search(r"done\s+\[15/21\] round 1 · evaluate Self-Explore\s+[\d.]+ s\s+accuracy \d\.\d{3}", status)
    assert status.splitlines()[-1] == f"complete: {run / 'report.md'}"
    card = (run / "round_2/self_explore/policy/README.md").read_text()  # each exported policy: a model card
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert f"| greedy accuracy | {units['round_2/self_explore/eval']['accuracy']:.3f} |" in card


def test_verbose_shows_what_libraries_print(scripted, tmp_path, capfd) -> None:
    config = _yaml(tmp_path / "run", tmp_path / "c.yaml", rounds=1, baselines=[])
    main(["pipeline", "--config", str(config), "--verbose", "true"])
    out, err = capfd.readouterr()
    assert "GPU available" in out + err and "Seed set" in out + err
    assert len(re.findall(r"^\[\s*\d+/11\] ", out, re.M)) == 11


BLOCKING_RUN = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import selfexplore.pipeline.run as pipeline_run
from test_pipeline import ScriptedSampler, _config

class Blocking(ScriptedSampler):
    def generate(self, *args, **kwargs):
        Path({started!r}).touch()
        time.sleep(600)  # until the test kills this process

pipeline_run.get_sampler = lambda config, policy, **kw: Blocking(policy)
pipeline_run.run_pipeline(_config(Path({run!r}), rounds=1, baselines=[]))
"""


def test_status_of_a_running_then_killed_run(tmp_path: Path) -> None:
    run, started = tmp_path / "run", tmp_path / "started"
    code = BLOCKING_RUN.format(tests=str(TESTS), started=str(started), run=str(run))
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():  # SFT trained; its evaluation is sampling
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        running = render_status(run)
    finally:
        process.kill()
        process.wait()
    assert running.splitlines()[0].startswith(f"{run}: 11 units: 2 done, 1 running, 8 to do")
    assert re.search(rf"running\s+\[ 3/11\] round 0 · evaluate SFT\s+for [\d.]+ s \(pid {process.pid}\); "
                     r"now round_0/sft/eval.jsonl", running)
    assert re.search(r"done\s+\[ 2/11\] round 0 · SFT training\s+[\d.]+ s", running)
    assert running.splitlines()[-1] == "next: round 1 · sample the SFT policy"
    killed = render_status(run)
    assert re.search(rf"INTERRUPTED\s+\[ 3/11\] round 0 · evaluate SFT\s+after [\d.]+ s: process {process.pid} "
                     "is gone", killed)
    # what a rerun does first: the interrupted unit again
    assert killed.splitlines()[-1] == "next: round 0 · evaluate SFT (rerun the pipeline command to resume)"


def test_status_of_a_failed_run_shows_the_error(tmp_path: Path, monkeypatch) -> None:
    import selfexplore.pipeline.run as pipeline_run

    class Broken(SamplerBase):
        generated_tokens = 0

        def generate(self, *args, **kwargs):
            raise RuntimeError("the sampler broke")

    monkeypatch.setattr(pipeline_run, "get_sampler", lambda config, policy, **kw: Broken())
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the sampler broke"):
        run_pipeline(_config(run, rounds=1, baselines=[]))
    status = render_status(run)
    assert re.search(r"FAILED\s+\[ 3/11\] round 0 · evaluate SFT\s+after [\d.]+ s: RuntimeError: the sampler broke",
                     status)
    assert "11 units: 2 done, 1 failed, 8 to do" in status.splitlines()[0]
    assert status.splitlines()[-1] == "next: round 0 · evaluate SFT (rerun the pipeline command to resume)"


def _scalars(event_file: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from a TensorBoard event file (TFRecord framing around Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    data, out, at = event_file.read_bytes(), {}, 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at:at + 8])
        event = Event.FromString(data[at + 12:at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_logger_gets_each_unit_and_the_per_round_metrics(scripted, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX", reason="TensorBoardLogger needs tensorboard or tensorboardX (test extra)")
    run = tmp_path / "run"
    trainer = TrainerConfig(accelerator="cpu", enable_progress_bar=False, log_every_n_steps=1,
                              logger={"class_path": "TensorBoardLogger"})
    run_pipeline(_config(run, trainer=trainer))
    units = json.loads((run / "state.json").read_text())["units"]
    for unit in ("round_0/sft", "round_1/rft", "round_1/outcome_dpo", "round_1/self_explore", "round_2/self_explore"):
        assert list((run / "logs" / unit).glob("events.out.tfevents.*")), unit
    scalars = _scalars(next((run / "logs" / "pipeline").glob("events.out.tfevents.*")))
    assert scalars["sft/accuracy"] == [(0, pytest.approx(units["round_0/sft/eval"]["accuracy"]))]
    assert [step for step, _ in scalars["self_explore/accuracy"]] == [1, 2]
    assert scalars["self_explore/pairs"][1] == (2, units["round_2/explore"]["num_pairs"])
    hist = units["round_1/explore"]["pit_histogram"]
    assert {tag: v for tag, v in scalars.items() if tag.startswith("self_explore/pits/")} and all(
        scalars[f"self_explore/pits/step_{s}"][0] == (1, n) for s, n in hist.items())
    assert "train/loss" in _scalars(next((run / "logs/round_0/sft").glob("events.out.tfevents.*")))


def test_csv_is_the_default_logger_and_a_bad_class_path_is_refused(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trainer = TrainerConfig(accelerator="cpu", enable_progress_bar=False, log_every_n_steps=1)
    run_pipeline(_config(run, rounds=1, baselines=[], trainer=trainer))
    header, *rows = (run / "logs/pipeline/metrics.csv").read_text().splitlines()
    assert "rft/accuracy" in header.split(",") and len(rows) == 2  # SFT at round 0, RFT at round 1
    assert "train/loss" in (run / "logs/round_0/sft/metrics.csv").read_text().splitlines()[0]
    with pytest.raises(ValueError, match="trainer.logger.class_path 'NoSuchLogger'"):
        _config(run, trainer=TrainerConfig(logger={"class_path": "NoSuchLogger"}))


def _rows() -> list[dict]:
    from selfexplore.pipeline.compare import PairedChange

    def row(stage, round_, unit, builds_on, accuracy, pits=None, change=None):
        return {"stage": stage, "round": round_, "unit": unit, "builds_on": builds_on, "accuracy": accuracy,
                "sampled_accuracy": None, "pass_at_n": 0.8, "pairs": 9 if pits else None, "pits": pits,
                "pit_at_first_error": None, "tokens": 100, "seconds": 1.5, "change": change}

    return [row("SFT", 0, "round_0/sft", None, 0.25),
            row("RFT", 1, "round_1/rft", "round_0/sft", 0.5, change=PairedChange(3, 1, 0.625)),
            row("Self-Explore", 1, "round_1/self_explore", "round_1/rft", 0.75, {"1": 1, "2": 6, "3": 2},
                PairedChange(4, 1, 0.375)),
            row("Self-Explore", 2, "round_2/self_explore", "round_1/self_explore", 0.5, {"1": 4, "3": 1},
                PairedChange(1, 3, 0.625))]


def test_report_plots_pits_as_bars_over_integer_steps_and_marks_each_paired_change() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from selfexplore.pipeline.report import figure

    ax_acc, ax_pit = figure(_rows()).axes
    assert not ax_pit.lines and len(ax_pit.containers) == 2  # one group of bars per round
    assert list(ax_pit.get_xticks()) == [1, 2, 3]
    for bars in ax_pit.containers:
        centers = [p.get_x() + p.get_width() / 2 for p in bars.patches]
        assert [round(c) for c in centers] == [1, 2, 3] and all(abs(c - round(c)) < 0.4 for c in centers)
    assert [p.get_height() for p in ax_pit.containers[1].patches] == [4, 0, 1]
    texts = [t.get_text() for t in ax_acc.texts]
    assert texts[0] == "25.0" and texts[2] == "75.0\n+4 -1, p=0.38"
    dashed = [c.get_segments()[0] for c in ax_acc.collections]  # at the accuracy of the policy built on
    assert [(round((seg[0][0] + seg[1][0]) / 2), seg[0][1]) for seg in dashed] == [(1, 25.0), (2, 50.0), (3, 75.0)]


def test_each_policy_gets_a_hub_model_card_with_its_figures(tmp_path: Path) -> None:
    from selfexplore.models import ModelSpec
    from selfexplore.pipeline.card import write_model_cards

    rows = _rows()
    for row in rows:
        (tmp_path / "run" / row["unit"] / "policy").mkdir(parents=True)
    config = _config(tmp_path / "run", task="gsm8k", task_options={}, from_scratch=None,
                     model=ModelSpec(path="HuggingFaceTB/SmolLM2-135M"))
    cards = write_model_cards(tmp_path / "run", rows, config)
    assert cards == [tmp_path / "run" / r["unit"] / "policy" / "README.md" for r in rows]
    text = cards[2].read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "transformers" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert {"self-explore", "step-level-dpo"} <= set(meta["tags"]) and meta["datasets"] == ["openai/gsm8k"]
    assert "# run: Self-Explore round 1" in body and "unit `round_1/self_explore` (round 1)" in body
    assert "| greedy accuracy | 0.750 |" in body and "| change vs the policy it builds on | +4 -1 (p=0.38) |" in body
    assert "| first-pit steps | 1:1 2:6 3:2 |" in body and "pipeline.dpo" in body
    scratch = write_model_cards(tmp_path / "run", rows[:1], _config(tmp_path / "run"))[0].read_text()
    assert "base_model" not in yaml.safe_load(scratch.split("---\n")[1]) and "from scratch" in scratch
