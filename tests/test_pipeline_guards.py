"""What must not happen to a run directory: lost work, silent wrong results, poisoned state.

Each test reproduces one way a run went wrong (a changed setting under --force, a bad value,
a moved or doubly used run directory, a deleted output, a destroyed policy) on the miniature
pipeline of `test_pipeline` (scripted sampler, real training of a tiny model).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_pipeline import ARTIFACTS, TASK_OPTIONS, _config, dpo_stage, scripted  # noqa: F401 (a fixture)

from selfexplore.configdiff import config_diff
from selfexplore.explore.config import ExploreConfig
from selfexplore.pipeline.config import DPOStageConfig, SFTStageConfig, TrainerConfig
from selfexplore.pipeline.invalidate import units_to_redo
from selfexplore.pipeline.lock import RunLock, RunLocked
from selfexplore.pipeline.run import Pipeline, PipelineError, run_pipeline
from selfexplore.pipeline.state import RunStateError
from selfexplore.training.losses import DPOLossConfig
from selfexplore.training.optim import OptimizerConfig

SHORT = {"baselines": ["self_explore"], "rounds": 1}
UNITS = ["base", "round_0/sft", "round_0/sft/eval.jsonl", "round_0/sft/eval", "round_1/samples.jsonl",
         "round_1/rft_data", "round_1/rft", "round_1/rft/eval.jsonl", "round_1/rft/eval",
         "round_1/explorer_samples.jsonl", "round_1/pairs", "round_1/explore", "round_1/self_explore",
         "round_1/self_explore/eval.jsonl", "round_1/self_explore/eval", "round_2/explorer_samples.jsonl",
         "round_2/pairs", "round_2/explore", "round_2/self_explore", "round_2/self_explore/eval.jsonl",
         "round_2/self_explore/eval"]


def _state(run: Path) -> dict:
    return json.loads((run / "state.json").read_text())


# ----------------------------------------------------------------- --force redoes what changed

def test_units_to_redo_follow_the_settings_each_unit_reads() -> None:
    assert units_to_redo(["dpo.optimizer.lr"], UNITS, rounds=2) == UNITS[UNITS.index("round_1/self_explore"):]
    assert units_to_redo(["eval_limit"], UNITS, rounds=2) == [
        u for u in UNITS if u.rsplit("/", 1)[-1].startswith("eval")]
    assert units_to_redo(["explore.k"], UNITS, rounds=2) == UNITS[UNITS.index("round_1/explore"):]
    assert units_to_redo(["rounds"], UNITS, rounds=1) == [u for u in UNITS if u.startswith("round_2/")]
    assert units_to_redo(["baselines"], UNITS, rounds=2) == []
    assert units_to_redo(["seed"], UNITS, rounds=2) == UNITS  # unknown reach: everything
    assert units_to_redo(["reference_update"], UNITS, rounds=2) == UNITS[UNITS.index("round_2/self_explore"):]
    # exploration settings never reach outcome DPO, which reads the outcome pairs only
    outcome = ["round_1/outcome_dpo", "round_1/outcome_dpo/eval.jsonl", "round_1/outcome_dpo/eval"]
    with_outcome = UNITS[:UNITS.index("round_1/self_explore")] + outcome + UNITS[UNITS.index("round_1/self_explore"):]
    redone = units_to_redo(["explore.k"], with_outcome, rounds=2)
    assert redone == [u for u in UNITS[UNITS.index("round_1/explore"):]] and not set(outcome) & set(redone)
    assert units_to_redo(["dpo.beta"], with_outcome, rounds=2) == outcome + UNITS[UNITS.index("round_1/self_explore"):]
    assert units_to_redo(["rft_init"], UNITS, rounds=2, rft_init="sft") == UNITS[UNITS.index("round_1/rft"):]
    assert config_diff({"dpo": {"optimizer": {"lr": 1e-6}, "beta": 0.1}},
                       {"dpo": {"optimizer": {"lr": 1e-3}, "beta": 0.1}}) == {"dpo.optimizer.lr": (1e-6, 1e-3)}


def test_force_with_a_changed_setting_redoes_the_units_it_affects(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_pipeline(_config(run, **SHORT))
    before = _state(run)["units"]
    changed = _config(run, **SHORT, dpo=dpo_stage(2e-4))
    with pytest.raises(RuntimeError, match=r"dpo\.optimizer\.lr: 0\.0001 -> 0\.0002"):
        run_pipeline(changed)
    weights = (run / "round_1/self_explore/policy/model.safetensors").read_bytes()
    run_pipeline(changed, force=True)
    assert (run / "round_1/self_explore/policy/model.safetensors").read_bytes() != weights, "retrained at the new lr"
    state = _state(run)
    redone = ["round_1/self_explore", "round_1/self_explore/eval.jsonl", "round_1/self_explore/eval"]
    assert state["forced"][-1]["redone"] == redone
    assert state["forced"][-1]["changed"] == {"dpo.optimizer.lr": [1e-4, 2e-4]}
    assert set(state["units"]) == set(before)
    for unit in set(before) - set(redone):  # the rest was kept, not recomputed
        assert state["units"][unit] == before[unit], unit
    # the record is the new config
    assert json.loads((run / "config.json").read_text())["dpo"]["optimizer"]["lr"] == 2e-4


# ----------------------------------------------------------------- bad values fail up front

def test_every_bad_value_is_listed_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as caught:
        _config(tmp_path / "run", eval_limit=0, train_questions=0, sft=SFTStageConfig(epochs=0, batch_size=0),
                dpo=DPOStageConfig(optimizer=OptimizerConfig(lr=-1.0), loss=DPOLossConfig(beta=0.0)),
                trainer=TrainerConfig(strategy="dpp", precision="bf15"))
    message = str(caught.value)
    for expected in ("eval_limit must be >= 1", "train_questions must be >= 1", "sft.epochs must be >= 1",
                     "sft.batch_size must be >= 1", "dpo.optimizer.lr must be > 0", "dpo.loss: beta must be > 0",
                     "trainer.strategy 'dpp'", "trainer.precision 'bf15'"):
        assert expected in message, expected
    with pytest.raises(ValueError, match="eval_limit must be >= 1"):
        _config(tmp_path / "run", eval_limit=-5)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("bad", [{"task": "nope"}, {"task_options": {"train_sise": 3}},
                                 {"data_dir": "missing-dir"}, {"eval_split": "dev"}])
def test_config_errors_found_late_leave_no_state_behind(scripted, tmp_path: Path, bad: dict) -> None:
    run = tmp_path / "run"
    with pytest.raises((ValueError, TypeError, KeyError, FileNotFoundError)):
        Pipeline(_config(run, **SHORT, **bad)).setup()
    assert not (run / "state.json").exists()
    run_pipeline(_config(run, **SHORT))  # the corrected command is not refused


def test_a_run_with_no_completed_unit_takes_any_config(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    Pipeline(_config(run, **SHORT)).setup().close()
    Pipeline(_config(run, **SHORT, seed=3)).setup().close()  # nothing was computed under the first config


# ----------------------------------------------------------------- the run directory itself

def test_a_moved_run_directory_continues_where_it_stopped(scripted, tmp_path: Path, monkeypatch) -> None:
    run_pipeline(_config(tmp_path / "reference", **SHORT))
    original = Pipeline.explore
    monkeypatch.setattr(Pipeline, "explore", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_config(tmp_path / "first", **SHORT))
    monkeypatch.setattr(Pipeline, "explore", original)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    assert "first" not in (tmp_path / "moved" / "state.json").read_text()  # paths are recorded relative
    monkeypatch.chdir(tmp_path)
    run_pipeline(_config(Path("moved/"), **SHORT))  # relative, with a trailing slash
    for name in ARTIFACTS:
        if name.startswith(("round_0", "round_1")):
            assert (tmp_path / "moved" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_a_second_pipeline_on_a_run_directory_is_refused_until_the_first_ends(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from selfexplore.pipeline.lock import RunLock
        with RunLock({str(run)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=rf"in use by another pipeline \(.*\"pid\": {holder.pid}"):
            Pipeline(_config(run, **SHORT)).setup()
    finally:
        holder.kill()  # a killed holder must not leave the lock behind
        holder.wait()
    Pipeline(_config(run, **SHORT)).setup().close()
    with RunLock(run), pytest.raises(RunLocked):  # also within one process
        RunLock(run).acquire()


# ----------------------------------------------------------------- outputs of completed units

def test_a_deleted_output_of_a_completed_unit_is_named_and_redone_with_force(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_pipeline(_config(run, **SHORT))
    expected = (run / "round_1/explore/gpairs.jsonl").read_text()
    (run / "round_1/explore/gpairs.jsonl").unlink()
    with pytest.raises(PipelineError, match=r"gpairs\.jsonl: file missing.*'round_1/explore'.*--force"):
        run_pipeline(_config(run, **SHORT))
    run_pipeline(_config(run, **SHORT), force=True)
    assert (run / "round_1/explore/gpairs.jsonl").read_text() == expected


def test_temporaries_of_a_killed_export_are_removed_when_the_unit_completes(scripted, tmp_path: Path,
                                                                           monkeypatch) -> None:
    from selfexplore.training.policy import PolicyModule

    run = tmp_path / "run"
    export = PolicyModule.export

    def killed_export(self, out_dir, *args, **kwargs):
        leftover = Path(out_dir).parent / f".{Path(out_dir).name}.tmp-killed"
        leftover.mkdir(parents=True)
        (leftover / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PolicyModule, "export", killed_export)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_config(run, **SHORT))
    assert (run / "round_0/sft/.policy.tmp-killed").is_dir()
    monkeypatch.setattr(PolicyModule, "export", export)
    run_pipeline(_config(run, **SHORT))
    assert not list(run.rglob("*.tmp-*")) and (run / "round_0/sft/policy").is_dir()


# ----------------------------------------------------------------- a destroyed policy

def test_a_policy_destroyed_by_its_last_step_stops_the_run_naming_the_cause(scripted, tmp_path: Path) -> None:
    run = tmp_path / "run"
    destroy = dpo_stage(1e3, batch_size=64)  # one step
    with pytest.raises(PipelineError,
                       match=r"round_1/self_explore: the trained policy collapsed.*dpo\.optimizer\.lr=1000"):
        run_pipeline(_config(run, **SHORT, dpo=destroy))
    assert "round_1/self_explore" not in _state(run)["units"]
    assert not (run / "round_1/self_explore/policy").exists()
    assert set(ARTIFACTS[:5]) <= {a for a in ARTIFACTS if (run / a).exists()}  # the earlier work is kept
    before = _state(run)["units"]
    with pytest.raises(PipelineError, match=r"rerun with --force true") as advice:
        run_pipeline(_config(run, **SHORT, dpo=destroy))
    assert "lower dpo.optimizer.lr" in str(advice.value)
    run_pipeline(_config(run, **SHORT, dpo=dpo_stage(1e-4)), force=True)  # the advice, as given
    after = _state(run)["units"]
    assert "round_1/self_explore/eval" in after
    assert all(after[u] == before[u] for u in before if not u.startswith("round_1/self_explore"))  # kept


def test_collapse_means_losing_nearly_all_the_references_advantage_over_uniform() -> None:
    from selfexplore.pipeline.run import collapsed

    uniform = -5.7
    assert collapsed(-5.7, -1.0, uniform) and collapsed(float("nan"), -1.0, uniform)
    assert not collapsed(-3.0, -1.0, uniform)  # DPO lowered the chosen log-probs: allowed
    assert not collapsed(-5.69, -5.5, uniform)  # an uninformed reference: nothing to judge by


def test_a_pipeline_yaml_with_bad_values_lists_them_all_before_any_work(tmp_path: Path, capsys) -> None:
    from selfexplore.cli import main

    run = tmp_path / "run"
    config = tmp_path / "bad.yaml"
    config.write_text(textwrap.dedent(f"""
        pipeline:
          run_dir: {run}
          from_scratch: {{hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 2, intermediate_size: 64}}
          eval_limit: 0
          sft: {{epochs: 0, optimizer: {{lr: -1.0}}}}
          dpo: {{optimizer: {{lr: 0.0}}, loss: {{beta: -0.1}}, max_prompt_length: 999}}
          sampling: {{temperature: -1.0, shard_size: 0}}
          explore: {{top_p: 1.5, k: 0}}
          trainer: {{num_nodes: 0}}
    """))
    with pytest.raises((SystemExit, ValueError)) as caught:
        main(["pipeline", "--config", str(config)])
    message = f"{caught.value}\n{capsys.readouterr().err}"
    for expected in ("eval_limit must be >= 1 (or null for all), got 0", "sft.epochs must be >= 1",
                     "sft.optimizer.lr must be > 0",
                     "dpo.optimizer.lr must be > 0", "dpo.loss: beta must be > 0", "dpo.max_prompt_length",
                     "sampling.temperature must be >= 0 (0 = greedy), got -1.0",
                     "sampling.shard_size must be >= 1, got 0",
                     "explore.top_p must be in (0, 1], got 1.5", "explore.k must be >= 1, got 0",
                     "trainer.num_nodes must be >= 1, got 0"):
        assert expected in message, (expected, message)
    assert not run.exists()


def test_a_stage_given_in_part_keeps_its_own_defaults(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    from selfexplore.pipeline.config import PipelineConfig

    parser = ArgumentParser()
    parser.add_argument("--pipeline", type=PipelineConfig)
    cfg = parser.instantiate_classes(parser.parse_args([
        "--pipeline.from_scratch", "{hidden_size: 64, num_layers: 1, num_heads: 2, num_kv_heads: 2}",
        "--pipeline.run_dir", str(tmp_path), "--pipeline.dpo.optimizer.lr", "1e-4"])).pipeline
    assert (cfg.dpo.optimizer.name, cfg.dpo.optimizer.lr, cfg.dpo.scheduler.warmup_ratio) == ("rmsprop", 1e-4, 0.1)
    assert (cfg.sft.optimizer.name, cfg.sft.optimizer.lr) == ("adamw", 1e-5)


def test_a_rank_that_does_not_share_the_run_directory_says_so(tmp_path: Path, monkeypatch) -> None:
    import selfexplore.pipeline.run as pipeline_run

    monkeypatch.setattr(pipeline_run, "SHARED_RUN_DIR_SECONDS", 1.0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="sees no recent state.json from rank 0.*every rank of every node shares"):
        Pipeline(_config(tmp_path / "run", **SHORT)).setup()


def test_engine_knobs_the_explore_schedule_and_logging_do_not_make_another_configuration(
        scripted, tmp_path: Path) -> None:
    from selfexplore.sampling.base import SamplingConfig

    run = tmp_path / "run"
    first = Pipeline(_config(run, **SHORT)).setup()
    first.build_base()
    first.close()
    engine = SamplingConfig(n=4, max_new_tokens=48, gpu_memory_utilization=0.5, enforce_eager=True)
    trainer = TrainerConfig(accelerator="cpu", enable_progress_bar=False, log_every_n_steps=1)
    schedule = ExploreConfig(k=2, max_new_tokens=48, schedule="waves")  # when draws are made, not which
    again = Pipeline(_config(run, **SHORT, sampling=engine, trainer=trainer, explore=schedule)).setup()
    assert again.state.done("base") and not again.state.redone
    again.close()


def test_expected_failures_are_one_line_with_the_traceback_in_the_log(scripted, tmp_path: Path, capsys) -> None:
    from selfexplore.cli import main

    run = tmp_path / "run"
    first = Pipeline(_config(run, **SHORT)).setup()
    first.build_base()
    first.close()
    config = tmp_path / "other.yaml"
    config.write_text(textwrap.dedent(f"""
        pipeline:
          run_dir: {run}
          seed: 5
          task_options: {json.dumps(TASK_OPTIONS)}
          from_scratch: {{hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 2, intermediate_size: 128,
                          vocab_size: 300, max_position_embeddings: 256}}
          trainer: {{accelerator: cpu}}
    """))
    with pytest.raises(SystemExit) as caught:
        main(["pipeline", "--config", str(config)])
    message = str(caught.value)
    assert message.startswith("selfexplore pipeline: RunStateError: ") and "--force" in message
    assert "pipeline.log" in message and "Traceback" not in message + capsys.readouterr().err
    assert "Traceback (most recent call last)" in (run / "pipeline.log").read_text()
    with pytest.raises(RunStateError):  # --verbose shows the error itself, traceback and all
        main(["pipeline", "--config", str(config), "--verbose", "true"])


def test_a_full_disk_names_the_unit_and_a_rerun_continues(scripted, tmp_path: Path, monkeypatch) -> None:
    import errno

    import selfexplore.pipeline.run as pipeline_run

    write_jsonl = pipeline_run.write_jsonl

    def full(path, records):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline_run, "write_jsonl", full)
    run = tmp_path / "run"
    with pytest.raises(PipelineError, match=r"unit round_1/rft_data: no space left on the device writing .*run.*"
                                            r"GiB free there now.*completed units are kept"):
        run_pipeline(_config(run, **SHORT))
    monkeypatch.setattr(pipeline_run, "write_jsonl", write_jsonl)
    run_pipeline(_config(run, **SHORT))
    assert "round_1/rft_data" in _state(run)["units"]
