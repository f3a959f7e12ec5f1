"""The one-command pipeline: a miniature run end to end, resume after kills, round transitions.

Training runs for real on a tiny from-scratch model. Sampling uses a scripted sampler that
writes the gold steps with seeded random arithmetic slips (an error propagates to the final
answer), so the run is fast, deterministic and always yields pairs and first pits, whatever
a seconds-long training makes of the tiny model.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

import selfexplore.pipeline.run as pipeline_run
from selfexplore.explore.config import ExploreConfig
from selfexplore.models import ModelSpec, TinyLlamaConfig
from selfexplore.pipeline.config import DPOStageConfig, PipelineConfig, SFTStageConfig, TrainerConfig
from selfexplore.pipeline.run import Pipeline, run_pipeline
from selfexplore.pipeline.state import RunStateError
from selfexplore.sampling.base import SamplerBase, SamplingConfig
from selfexplore.tasks import get_task
from selfexplore.training.optim import OptimizerConfig

TASK_OPTIONS = {"train_size": 48, "validation_size": 8, "test_size": 8, "min_steps": 2, "max_steps": 3,
                "max_operand": 20, "operations": ["+", "-"]}


class ScriptedSampler(SamplerBase):
    """Continues a prompt with the gold steps, each slipping (result + 1) with probability 0.3."""

    def __init__(self, policy: str) -> None:
        task = get_task("arith", **TASK_OPTIONS)
        self.gold = {task.prompt(p): p.solution.split("\n") for s in ("train", "test") for p in task.load(s)}
        self.policy = policy
        self.generated_tokens = 0

    def _continue(self, prompt: str, rng: random.Random) -> str:
        question = next(q for q in self.gold if prompt.startswith(q))
        done = [line for line in prompt[len(question):].split("\n") if line]
        steps = self.gold[question]
        slipped = any(line not in steps for line in done)
        out = []
        for line in steps[len(done):]:
            if line.startswith("The answer is"):
                value = int(line.rsplit(" ", 1)[1]) + (1 if slipped else 0)
                out.append(f"The answer is {value}")
            elif "=" in line and rng.random() < 0.3:
                slipped = True
                out.append(re.sub(r"= (\d+)$", lambda m: f"= {int(m.group(1)) + 1}", line))
            else:
                out.append(line)
        return "\n".join(out)

    def identity(self) -> str:
        """What the draws depend on besides prompt and seed: the policy's path in its run."""
        return "/".join(Path(self.policy).parts[-3:])  # the same across run directories

    def generate(self, prompts, n, draws, seed):
        results = []
        policy = self.identity()
        for prompt in prompts:
            key = f"{policy}|{prompt}" if draws.temperature == 0 else f"{policy}|{prompt}|{seed}"
            rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
            results.append([self._continue(prompt, rng) for _ in range(n)])
            self.generated_tokens += sum(len(c.split()) for c in results[-1])
        return results


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_run, "get_sampler", lambda config, policy, **kw: ScriptedSampler(policy))


def dpo_stage(lr: float, optimizer: str = "rmsprop", **overrides) -> DPOStageConfig:
    """The miniature's DPO stage (one epoch, short sequences) at learning rate `lr`."""
    fields = dict(epochs=1, batch_size=8, max_length=128, max_prompt_length=96)
    return DPOStageConfig(**{**fields, **overrides}, optimizer=OptimizerConfig(name=optimizer, lr=lr))


def _config(run_dir: Path, **overrides) -> PipelineConfig:
    fields = dict(
        run_dir=str(run_dir), task="arith", task_options=TASK_OPTIONS,
        from_scratch=TinyLlamaConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                                     intermediate_size=128, vocab_size=300, max_position_embeddings=256),
        trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
        sft=SFTStageConfig(epochs=1, batch_size=16, max_length=128, optimizer=OptimizerConfig(lr=3e-3)),
        rft=SFTStageConfig(epochs=1, batch_size=16, max_length=128, optimizer=OptimizerConfig(lr=3e-3)),
        dpo=dpo_stage(1e-4),
        sampling=SamplingConfig(n=4, max_new_tokens=48),
        explore=ExploreConfig(k=2, max_new_tokens=48),
        train_questions=12, rounds=2, eval_max_new_tokens=48,
    )
    return PipelineConfig(**{**fields, **overrides})


ARTIFACTS = ["round_1/samples.jsonl", "round_1/rft.jsonl", "round_1/pairs.jsonl", "round_1/explore/explore.jsonl",
             "round_1/explore/gpairs.jsonl", "round_2/pairs.jsonl", "round_2/explore/gpairs.jsonl",
             "round_0/sft/eval.jsonl", "round_2/self_explore/eval.jsonl"]


def _read(run_dir: Path) -> dict[str, str]:
    return {a: (run_dir / a).read_text() for a in ARTIFACTS}


def test_miniature_pipeline_runs_end_to_end(scripted, tmp_path: Path) -> None:
    report = run_pipeline(_config(tmp_path / "run"))
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())["units"]
    for unit in ("round_0/sft", "round_1/rft", "round_1/outcome_dpo", "round_1/self_explore",
                 "round_2/self_explore", "round_1/explore", "round_2/explore"):
        assert unit in state, unit
    for r in (1, 2):
        gpairs = [json.loads(line) for line in (run / f"round_{r}/explore/gpairs.jsonl").read_text().splitlines()]
        assert gpairs and all(p["chosen"] and p["rejected"] and p["chosen"] != p["rejected"] for p in gpairs)
        assert all(p["meta"]["round"] == r for p in gpairs)
        assert (run / f"round_{r}/self_explore/policy/config.json").is_file()
    gold = {p.id: p.solution.split("\n") for p in get_task("arith", **TASK_OPTIONS).load("train")}
    for r in (1, 2):  # arith rationales are canonical: the report says how many pits are the first error
        explore = state[f"round_{r}/explore"]
        pits = [json.loads(line) for line in (run / f"round_{r}/explore/explore.jsonl").read_text().splitlines()]
        pits = [p for p in pits if p["status"] == "pit"]
        at = [p["pit"] == next(t for t, (a, b) in enumerate(zip(p["steps"] + [""], gold[p["question_id"]]), 1)
                               if a != b)
              for p in pits]
        assert explore["pits_checked"] == explore["num_pits"] == len(pits) > 0
        assert explore["pit_at_first_error"] == pytest.approx(sum(at) / len(at))
    text = report.read_text()
    assert "pit_at_first_error" in text.splitlines()[4]
    for row in ("| SFT | 0 |", "| RFT | 1 |", "| Outcome DPO | 1 |", "| Self-Explore | 1 |", "| Self-Explore | 2 |"):
        assert row in text
    assert (run / "report.png").stat().st_size > 1000
    # change: questions fixed / broken against the policy the row builds on, from the eval files
    header = [h.strip() for h in text.splitlines()[4].strip("|").split("|")]
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line.strip("|").split("|")
             for line in text.splitlines() if line.startswith("| ") and "stage" not in line}
    graded = {u: {r["question_id"]: r["correct"]
                  for r in map(json.loads, (run / u / "eval.jsonl").read_text().splitlines())}
              for u in ("round_0/sft", "round_1/rft", "round_1/outcome_dpo", "round_1/self_explore",
                        "round_2/self_explore")}
    for key, before, after in ((("Outcome DPO", "1"), "round_1/rft", "round_1/outcome_dpo"),
                               (("Self-Explore", "1"), "round_1/rft", "round_1/self_explore"),
                               (("Self-Explore", "2"), "round_1/self_explore", "round_2/self_explore"),
                               (("RFT", "1"), "round_0/sft", "round_1/rft")):
        fixed = sum(graded[after][q] and not graded[before][q] for q in graded[before])
        broken = sum(graded[before][q] and not graded[after][q] for q in graded[before])
        assert cells[key][header.index("change")].strip().startswith(f"+{fixed} -{broken} (p=")
    assert cells[("SFT", "0")][header.index("change")].strip() == "-"


def test_each_round_trains_its_pairs_from_the_last_policy_against_the_configured_reference(
        scripted, tmp_path, monkeypatch) -> None:
    seen = []
    original = Pipeline._fit

    def spy(self, module, data, out_dir, stage):
        if Path(out_dir).name == "self_explore":
            seen.append((Path(data.train_path).parent.parent.name, module.model_spec.path, module.reference_path))
        return original(self, module, data, out_dir, stage)

    monkeypatch.setattr(Pipeline, "_fit", spy)
    for update in ("keep", "update"):
        run = tmp_path / update
        seen.clear()
        run_pipeline(_config(run, reference_update=update, baselines=["self_explore"]))
        rft, first = str(run / "round_1/rft/policy"), str(run / "round_1/self_explore/policy")
        assert seen == [("round_1", rft, rft), ("round_2", first, rft if update == "keep" else first)]


@pytest.mark.parametrize("rft_init", ["base", "sft"])
def test_rft_starts_from_the_configured_checkpoint(scripted, tmp_path, monkeypatch, rft_init) -> None:
    inits = {}
    original = Pipeline.train_sft

    def spy(self, name, init, stage, train_path=None):
        inits[name] = init
        return original(self, name, init, stage, train_path)

    monkeypatch.setattr(Pipeline, "train_sft", spy)
    run = tmp_path / "run"
    run_pipeline(_config(run, rft_init=rft_init, baselines=[], rounds=1))
    expected = str(run / "base") if rft_init == "base" else str(run / "round_0/sft/policy")
    assert inits == {"round_0/sft": str(run / "base"), "round_1/rft": expected}


def test_from_scratch_base_lives_in_the_run_dir_unless_given() -> None:
    assert _config(Path("runs/a")).model.path == str(Path("runs/a") / "base")
    assert _config(Path("runs/a"), model=ModelSpec(path="elsewhere")).model.path == "elsewhere"
    with pytest.raises(ValueError, match="model is required"):
        _config(Path("runs/a"), from_scratch=None)


class Killed(RuntimeError):
    """Stands in for a process killed between two units of work."""


def test_kill_and_resume_at_stage_boundaries_gives_same_artifacts(scripted, tmp_path, monkeypatch) -> None:
    run_pipeline(_config(tmp_path / "reference"))
    expected = _read(tmp_path / "reference")
    original = Pipeline.unit
    # kill before the 2nd, 5th, 9th, ... new unit of each successive attempt: boundaries in the SFT,
    # RFT, exploration, baseline and Self-Explore stages, and inside the round transition
    for budget in (1, 4, 5, 4, 3, 2):
        started = {"n": 0}

        def dying(self, name, work, collective=False, budget=budget, started=started):
            if not self.state.done(name):
                started["n"] += 1
                if started["n"] > budget:
                    raise Killed(f"killed before {name}")
            return original(self, name, work, collective)

        monkeypatch.setattr(Pipeline, "unit", dying)
        with pytest.raises(Killed):
            run_pipeline(_config(tmp_path / "resumed"))
    monkeypatch.setattr(Pipeline, "unit", original)
    run_pipeline(_config(tmp_path / "resumed"))
    resumed = _read(tmp_path / "resumed")
    for name in ARTIFACTS:
        assert resumed[name] == expected[name], name


def test_run_dir_of_another_config_is_refused(scripted, tmp_path: Path) -> None:
    cfg = _config(tmp_path / "run", baselines=[], rounds=1)
    Pipeline(cfg).setup().build_base()
    with pytest.raises(RunStateError, match=r"different configuration \(seed: 0 -> 7\)"):
        Pipeline(_config(tmp_path / "run", baselines=[], rounds=1, seed=7)).setup()
    forced = Pipeline(_config(tmp_path / "run", baselines=[], rounds=1, seed=7), force=True).setup()
    assert forced.state.redone == ["base"]


def test_held_out_questions_are_sampled_instead_of_the_sft_ones(scripted, tmp_path: Path) -> None:
    run_pipeline(_config(tmp_path / "run", sft_questions=30, sample_questions="held_out", train_questions=None,
                         baselines=[], rounds=1))
    run = tmp_path / "run"
    train = [p.id for p in get_task("arith", **TASK_OPTIONS).load("train")]
    sampled = {json.loads(line)["question_id"] for line in (run / "round_1/samples.jsonl").read_text().splitlines()}
    assert sampled == set(train[30:])
    rft = [json.loads(line)["meta"] for line in (run / "round_1/rft.jsonl").read_text().splitlines()]
    gold = {m["question_id"] for m in rft if m["sample_id"] == "gold"}
    assert gold == set(train[:30])  # SFT's gold rationales; the held-out questions contribute samples only
    assert {m["question_id"] for m in rft if m["sample_id"] != "gold"} <= set(train[30:])
    with pytest.raises(ValueError, match="needs sft_questions"):
        _config(tmp_path / "a", sample_questions="held_out")
    with pytest.raises(ValueError, match="none are left"):
        Pipeline(_config(tmp_path / "b", sample_questions="held_out", sft_questions=48)).setup()


def test_unknown_baseline_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"baselines: unknown \['ppo'\]"):
        _config(tmp_path, baselines=["ppo"])


def test_eval_samples_reports_sampled_accuracy_next_to_greedy(scripted, tmp_path: Path) -> None:
    report = run_pipeline(_config(tmp_path / "run", baselines=[], rounds=1, eval_samples=3))
    run = tmp_path / "run"
    metrics = json.loads((run / "state.json").read_text())["units"]["round_0/sft/eval"]
    records = [json.loads(line) for line in (run / "round_0/sft/eval_sampled.jsonl").read_text().splitlines()]
    by_question: dict[str, list[bool]] = {}
    for r in records:
        by_question.setdefault(r["question_id"], []).append(r["correct"])
    assert len(by_question) == TASK_OPTIONS["test_size"] and all(len(v) == 3 for v in by_question.values())
    expected = sum(sum(v) / 3 for v in by_question.values()) / len(by_question)
    assert metrics["sampled_accuracy"] == pytest.approx(expected)
    assert 0 < expected < 1  # the scripted slips make some samples wrong: the metric is not trivially 0 or 1
    header = next(line for line in report.read_text().splitlines() if line.startswith("| stage"))
    assert "sampled_accuracy" in header
    with pytest.raises(ValueError, match="eval_samples"):
        _config(tmp_path / "other", eval_samples=-1)


def test_one_engine_per_policy_and_none_open_while_a_fit_trains(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    started: list[str] = []
    live: list[ScriptedSampler] = []

    class Counted(ScriptedSampler):
        def close(self) -> None:
            live.remove(self)

    def factory(config, policy, **kwargs):
        started.append(str(Path(policy).relative_to(run)))
        live.append(Counted(policy))
        return live[-1]

    fit = pipeline_run.Trainer.fit

    def checked_fit(self, *args, **kwargs):
        assert not live, "an engine is open while a fit trains"
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(pipeline_run, "get_sampler", factory)
    monkeypatch.setattr(pipeline_run.Trainer, "fit", checked_fit)
    run_pipeline(_config(run))
    # 10 sampling units (4 evaluations, 4 sample sets, 2 explorations) on 5 policies: 5 engine starts
    assert started == ["round_0/sft/policy", "round_1/rft/policy", "round_1/outcome_dpo/policy",
                       "round_1/self_explore/policy", "round_2/self_explore/policy"]
    assert not live, "the last engine is closed when the run ends"


def test_two_runs_of_one_config_on_one_machine_write_identical_files(tmp_path: Path) -> None:
    """Same seed, machine and library versions: byte-identical artifacts, sampled for real (HF)."""
    cfg = {"baselines": [], "rounds": 1, "train_questions": 6, "sampling": SamplingConfig(n=2, max_new_tokens=24),
           "explore": ExploreConfig(k=2, max_new_tokens=24), "eval_max_new_tokens": 24, "pairs_include_gold": True}
    for name in ("a", "b"):
        run_pipeline(_config(tmp_path / name, **cfg))
    files = ["round_0/sft/eval.jsonl", "round_1/samples.jsonl", "round_1/rft.jsonl", "round_1/rft/eval.jsonl",
             "round_1/pairs.jsonl", "round_1/explore/explore.jsonl", "round_1/explore/gpairs.jsonl",
             "round_0/sft/policy/model.safetensors", "round_1/rft/policy/model.safetensors", "base/tokenizer.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
