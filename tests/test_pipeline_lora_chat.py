"""The pipeline as the SmolLM2 config runs it, in miniature: GSM8K-style files (no validation
split), a tokenizer with a chat template, a LoRA policy (SFT -> merged export -> sample -> RFT ->
explore -> step-DPO with the adapter-disabled reference), `sft_questions` bounding the gold data.

Sampling is scripted (gold steps with seeded slips) so the run is fast and always finds pits.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import selfexplore.pipeline.run as pipeline_run
from selfexplore.explore.config import ExploreConfig
from selfexplore.models import LoraSpec, ModelSpec, build_tiny_llama, load_tokenizer
from selfexplore.models.chat import PromptFormat
from selfexplore.pipeline.config import (
    DPOStageConfig,
    PipelineConfig,
    SFTStageConfig,
    TrainerConfig,
)
from selfexplore.pipeline.run import run_pipeline
from selfexplore.sampling.base import SamplerBase, SamplingConfig
from selfexplore.tasks import get_task
from selfexplore.training.optim import OptimizerConfig

USER, ASSISTANT = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gsm8k_records(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        a, b, c = (rng.randint(1, 9) for _ in range(3))
        records.append({"question": f"Tom has {a} apples, gets {b} more, then {c} more. How many?",
                        "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n{a + b} + {c} = {a + b + c}\n"
                                  f"#### {a + b + c}"})
    return records


class ChatScripted(SamplerBase):
    """Continues a chat prompt with the gold steps; a sampled step slips (+1) with probability `slip`."""

    def __init__(self, gold: dict[str, list[str]], slip: float = 0.3) -> None:
        self.gold = gold
        self.slip = slip
        self.generated_tokens = 0

    def generate(self, prompts, n, draws, seed):
        out = []
        for i, prompt in enumerate(prompts):
            assert prompt.startswith(USER) and ASSISTANT in prompt, prompt  # the chat format reached sampling
            question, done = prompt[len(USER):].split(ASSISTANT)
            steps = self.gold[question]
            done_steps = [s for s in done.split("\n") if s]
            rng = random.Random(f"{seed}|{i}|{prompt}")
            completions = []
            for _ in range(n):
                slipped = any(s not in steps for s in done_steps)
                lines = []
                for line in steps[len(done_steps):]:
                    if line.startswith("The answer is"):
                        lines.append(f"The answer is {int(line.split()[-1]) + slipped}")
                    elif draws.temperature > 0 and rng.random() < self.slip:
                        slipped = True
                        lines.append(line + "1")
                    else:
                        lines.append(line)
                completions.append("\n".join(lines))
            self.generated_tokens += n
            out.append(completions)
        return out


@pytest.fixture
def chat_base(tmp_path: Path) -> Path:
    """A tiny Llama whose tokenizer has ChatML special tokens and template (embeddings resized)."""
    from transformers import AutoModelForCausalLM

    from selfexplore.models import TinyLlamaConfig

    texts = [r["question"] + "\n" + r["answer"] for r in gsm8k_records(64, seed=1)]
    folder = build_tiny_llama(texts, tmp_path / "base", TinyLlamaConfig(
        hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128, vocab_size=300,
        max_position_embeddings=256))
    tok = load_tokenizer(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _setup(chat_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slip: float,
           **overrides) -> PipelineConfig:
    """GSM8K-style files (train/test only), the scripted sampler, and the SmolLM2-like config."""
    data = tmp_path / "gsm8k"
    data.mkdir()
    for name, records in (("train", gsm8k_records(16, seed=2)), ("test", gsm8k_records(4, seed=3))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    task = get_task("gsm8k")
    gold = {p.question.strip(): p.solution.split("\n") for s in ("train", "test")
            for p in task.load(s, data / f"{s}.jsonl")}
    monkeypatch.setattr(pipeline_run, "get_sampler", lambda config, policy, **kw: ChatScripted(gold, slip))
    return PipelineConfig(
        run_dir=str(tmp_path / "run"), task="gsm8k", data_dir=str(data),
        model=ModelSpec(path=str(chat_base), lora=LoraSpec(r=4, alpha=8)),
        prompt_format=PromptFormat(chat_template=True),
        trainer=TrainerConfig(accelerator="cpu", enable_progress_bar=False),
        sft=SFTStageConfig(epochs=1, batch_size=4, max_length=160, optimizer=OptimizerConfig(lr=1e-3)),
        rft=SFTStageConfig(epochs=1, batch_size=4, max_length=160, optimizer=OptimizerConfig(lr=1e-3)),
        dpo=DPOStageConfig(epochs=1, batch_size=4, max_length=192, max_prompt_length=128, reference="adapter",
                     optimizer=OptimizerConfig(name="adamw", lr=1e-4)),
        sampling=SamplingConfig(n=4, max_new_tokens=32), explore=ExploreConfig(k=2, max_new_tokens=32),
        **{"sft_questions": 6, "train_questions": 8, "rounds": 1, "baselines": ["self_explore"],
           "eval_max_new_tokens": 32, **overrides})


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_chat_pipeline_end_to_end(chat_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = run_pipeline(_setup(chat_base, tmp_path, monkeypatch, slip=0.3)).read_text()
    run = tmp_path / "run"
    for row in ("| SFT | 0 |", "| RFT | 1 |", "| Self-Explore | 1 |"):
        assert row in report
    state = json.loads((run / "state.json").read_text())["units"]
    assert state["round_0/sft"]["data"]["records"] == 6  # sft_questions bounds SFT's gold data
    rft = _jsonl(run / "round_1/rft.jsonl")
    assert sum(r["meta"]["sample_id"] == "gold" for r in rft) == 6
    assert all(r["prompt"].startswith(USER) and r["prompt"].endswith(ASSISTANT) for r in rft)
    samples = _jsonl(run / "round_1/samples.jsonl")
    assert {r["question_id"] for r in samples} <= {r["meta"]["question_id"] for r in rft}  # sampled from SFT's
    gpairs = _jsonl(run / "round_1/explore/gpairs.jsonl")
    assert gpairs and all(p["prompt"].startswith(USER) for p in gpairs)
    for stage in ("round_0/sft", "round_1/rft", "round_1/self_explore"):
        policy = run / stage / "policy"
        assert not (policy / "adapter_config.json").exists()  # LoRA merged into a plain HF folder
        assert load_tokenizer(policy).chat_template == CHATML


def test_gold_chosen_when_the_policy_never_answers_right(chat_base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    run_pipeline(_setup(chat_base, tmp_path, monkeypatch, slip=1.0, pairs_include_gold=True))
    run = tmp_path / "run"
    assert not any(r["correct"] for r in _jsonl(run / "round_1/explorer_samples.jsonl"))
    pairs = _jsonl(run / "round_1/pairs.jsonl")
    assert pairs and all(p["meta"]["chosen_id"].endswith(":gold") for p in pairs)
    gpairs = _jsonl(run / "round_1/explore/gpairs.jsonl")
    assert gpairs and all(p["meta"]["pit_step"] == 1 for p in gpairs)  # every first step is already a pit
    assert (run / "round_1/self_explore/policy/config.json").is_file()


def test_adapter_reference_under_keep_continues_the_last_adapter_on_the_rft_base(
        chat_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2's reference must stay RFT: its policy is RFT + round 1's adapter, continued, so that
    disabling the adapter gives RFT (a fresh adapter on round 1's merged policy would give round 1)."""
    specs = {}
    fit = pipeline_run.Pipeline._fit

    def spy(self, module, data, out_dir, stage):
        specs[Path(out_dir).parent.name + "/" + Path(out_dir).name] = module.model_spec
        return fit(self, module, data, out_dir, stage)

    monkeypatch.setattr(pipeline_run.Pipeline, "_fit", spy)
    run_pipeline(_setup(chat_base, tmp_path, monkeypatch, slip=0.3, rounds=2))
    run = tmp_path / "run"
    first, second = specs["round_1/self_explore"], specs["round_2/self_explore"]
    assert first.path == str(run / "round_1/rft/policy") and first.lora is not None and first.adapter_path is None
    assert second.path == str(run / "round_1/rft/policy") and second.lora is None
    assert second.adapter_path == str(run / "round_1/self_explore/adapter")
    assert (run / "round_1/self_explore/adapter/adapter_config.json").is_file()
    assert (run / "round_2/self_explore/policy/config.json").is_file()


def test_the_verifier_trains_with_the_runs_lora_settings(chat_base: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from selfexplore.pipeline.config import VerifierStageConfig
    from selfexplore.prm.selectors import SelectionConfig
    from selfexplore.prm.unit import VerifierConfig
    from selfexplore.prm.verifier import StepVerifierModule

    verifier = VerifierStageConfig(train=VerifierConfig(epochs=1, batch_size=4, max_length=256, val_fraction=0.5),
                                   outcome=False, implicit=False, samples=2, selection=SelectionConfig(ns=[1, 2]))
    specs = []
    configure = StepVerifierModule.configure_model

    def spy(self):
        specs.append(self.model_spec)
        configure(self)

    monkeypatch.setattr(StepVerifierModule, "configure_model", spy)
    run_pipeline(_setup(chat_base, tmp_path, monkeypatch, slip=0.3, verifier=verifier))
    assert specs[0].lora == LoraSpec(r=4, alpha=8) and specs[0].path.endswith("round_1/verifier/base")
    run = tmp_path / "run"
    state = json.loads((run / "state.json").read_text())["units"]
    assert "auroc" in state["round_1/verifier"]["verifier"] and "round_1/self_explore/selection" in state
    assert not (run / "round_1/verifier/verifier/adapter_config.json").exists()  # trained as LoRA, exported merged
