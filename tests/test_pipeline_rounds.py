"""Rounds are reproducible from their recorded inputs: the reference every round trains against,
resume after a kill between rounds, and `--force` after a change that retrains a policy.

The sampler here writes what depends on the policy's *weights* (not its path, as a real engine
does), so a stale shard of an earlier policy, or a round trained against the wrong reference,
shows in the files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_pipeline import Killed, ScriptedSampler, _config, dpo_stage

import selfexplore.pipeline.run as pipeline_run
from selfexplore.data.preference import PreferenceDataModule
from selfexplore.hashing import file_sha256
from selfexplore.models import ModelSpec
from selfexplore.pipeline.run import Pipeline, run_pipeline
from selfexplore.training.dpo import StepDPOModule


class WeightsSampler(ScriptedSampler):
    """ScriptedSampler whose draws depend on the policy's weights (not its path) and the seed."""

    def identity(self) -> str:
        return file_sha256(Path(self.policy) / "model.safetensors")[:16]


@pytest.fixture
def by_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_run, "get_sampler", lambda config, policy, **kw: WeightsSampler(policy))


def _results(run: Path) -> dict[str, str]:
    """sha256 of every result file: merged samples, pairs, explorations, evaluations, weights, reference tables
    (not the shards the merged files are made of, nor bookkeeping, logs and timings)."""
    files = [p for p in run.rglob("*") if p.is_file() and (
        p.suffix == ".jsonl" and not any(part.endswith(("shards",)) for part in p.parts)
        or p.suffix == ".safetensors" or p.parent.name == "reference_cache")]
    return {str(p.relative_to(run)): file_sha256(p) for p in files}


def _kill_before(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    original = Pipeline.unit

    def dying(self, name, work, collective=False):
        if name == target and not self.state.done(name):
            raise Killed(f"killed before {name}")
        return original(self, name, work, collective)
    monkeypatch.setattr(Pipeline, "unit", dying)


@pytest.mark.slow
def test_three_rounds_killed_between_rounds_and_resumed_equal_the_uninterrupted_run(
        by_weights, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = dict(rounds=3, baselines=["self_explore"])
    run_pipeline(_config(tmp_path / "uninterrupted", **config))
    expected = _results(tmp_path / "uninterrupted")
    assert sum(name.endswith("self_explore/policy/model.safetensors") for name in expected) == 3
    original = Pipeline.unit
    for target in ("round_2/explorer_samples.jsonl", "round_3/self_explore"):  # between rounds; a round's fit
        _kill_before(monkeypatch, target)
        with pytest.raises(Killed):
            run_pipeline(_config(tmp_path / "resumed", **config))
        monkeypatch.setattr(Pipeline, "unit", original)
    run_pipeline(_config(tmp_path / "resumed", **config))
    resumed = _results(tmp_path / "resumed")
    assert sorted(resumed) == sorted(expected)
    assert [name for name in expected if resumed[name] != expected[name]] == []

    # keep: round 2 trained against the RFT policy's log-probs, cached under the RFT weights' key
    run = tmp_path / "uninterrupted"
    rft = run / "round_1/rft/policy"
    data = PreferenceDataModule(train_path=str(run / "round_2/explore/gpairs.jsonl"), max_length=128,
                                max_prompt_length=96, batch_size=8, seed=0, tokenizer_path=str(rft))
    data.setup("fit")
    module = StepDPOModule(ModelSpec(path=str(rft)), reference_cache_dir=str(run / "reference_cache"))
    module.configure_model()
    module.policy.eval()
    dataset = data.train_dataset
    with torch.no_grad():
        chosen, rejected = module._batch_logps(module.policy, data.collate([dataset[i] for i in range(len(dataset))]))
    table = torch.load(run / "reference_cache" / f"{module.reference_cache_key(dataset.fingerprint())}.pt")
    torch.testing.assert_close(table, torch.stack([chosen, rejected], dim=1).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_force_with_a_changed_dpo_lr_equals_a_fresh_run_with_that_lr(by_weights, tmp_path: Path) -> None:
    config = dict(rounds=2)
    run_pipeline(_config(tmp_path / "forced", **config))
    before = _results(tmp_path / "forced")
    run_pipeline(_config(tmp_path / "forced", **config, dpo=dpo_stage(3e-4)), force=True)
    run_pipeline(_config(tmp_path / "fresh", **config, dpo=dpo_stage(3e-4)))
    forced, fresh = _results(tmp_path / "forced"), _results(tmp_path / "fresh")
    # everything a fresh run with the new lr writes, the forced rerun wrote identically (the first lr's
    # reference tables may stay beside them in the content-addressed cache)
    assert [name for name in fresh if forced.get(name) != fresh[name]] == []
    assert before["round_1/rft/eval.jsonl"] == forced["round_1/rft/eval.jsonl"]  # untouched by the change
    assert before["round_2/self_explore/eval.jsonl"] != forced["round_2/self_explore/eval.jsonl"]


def test_a_miniature_run_with_verifiers_writes_prm_rows_and_the_verifier_report(by_weights, tmp_path: Path) -> None:
    import json

    from selfexplore.pipeline.config import VerifierStageConfig
    from selfexplore.pipeline.plan import plan_of
    from selfexplore.prm.config import ConsensusConfig
    from selfexplore.prm.selectors import SelectionConfig
    from selfexplore.prm.unit import VerifierConfig
    from selfexplore.training.optim import OptimizerConfig

    verifier = VerifierStageConfig(
        train=VerifierConfig(epochs=1, batch_size=8, max_length=160, val_fraction=0.25,
                             optimizer=OptimizerConfig(lr=1e-3)),
        samples=4, selection=SelectionConfig(ns=[1, 2, 4], subsets=3))
    run = tmp_path / "run"
    consensus = ConsensusConfig(k=2, max_new_tokens=48, seed=5)
    report = run_pipeline(_config(run, rounds=1, baselines=["self_explore"], verifier=verifier,
                                  consensus=consensus)).read_text()
    state = json.loads((run / "state.json").read_text())["units"]
    assert [u for u in plan_of(json.loads((run / "config.json").read_text())) if u not in state] == []
    rows = [json.loads(line) for line in (run / "round_1/prm.jsonl").read_text().splitlines()]
    assert rows and all(list(r)[:3] == ["prompt", "completions", "labels"] for r in rows)  # TRL's columns first
    explored = [r for r in rows if r["source"] == "explored"]
    assert explored and all(r["labels"] == [True] * (r["pit"] - 1) + [False] for r in explored)
    assert all(len(r["labels"]) == len(r["completions"]) == len(r["mc"]) for r in explored)
    # every pit re-explored with fresh draws by the round's explorer, the agreement recorded
    assert all(r["consensus"]["k"] == 2 for r in explored)
    assert state["round_1/prm"]["pits_checked"] == len(explored) and 0 <= state["round_1/prm"]["pit_agreement"] <= 1
    for unit in ("round_1/verifier", "round_1/outcome_verifier"):
        assert set(state[unit]["verifier"]) >= {"auroc", "balanced_accuracy", "negative_f1", "acc_err", "acc_cor", "f1"}
    for stage in ("round_1/rft", "round_1/self_explore"):
        curves = state[f"{stage}/selection"]["curves"]
        assert set(curves["majority"]) == {"1", "2", "4"}
        assert {"process/best_of_n", "process/weighted_vote", "process/best_of_n_last",
                "outcome/best_of_n"} <= set(curves)
        # pass@N is the ceiling every selector sits under, and grows with N
        assert all(c["4"]["mean"] <= curves["pass_at_n"]["4"]["mean"] + 1e-9 for c in curves.values())
        assert curves["pass_at_n"]["1"]["mean"] <= curves["pass_at_n"]["4"]["mean"]
    assert "implicit/weighted_vote" in state["round_1/self_explore/selection"]["curves"]  # a DPO policy only
    implicit = state["round_1/self_explore/selection"]["implicit_held_out"]  # on the verifiers' held-out rows
    assert set(implicit) == set(state["round_1/verifier"]["verifier"]) - {"loss"}
    assert "| implicit reward of round_1/self_explore |" in report
    assert "implicit/weighted_vote" not in state["round_1/rft/selection"]["curves"]
    assert "## Step verifiers" in report and "## Verifier-guided answers" in report
    assert "| process/weighted_vote |" in report and "### Self-Explore r1 (greedy" in report
    assert (run / "report_selection.png").stat().st_size > 1000
