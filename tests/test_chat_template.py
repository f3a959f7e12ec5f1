"""Prompt formats: raw vs chat template, one BOS, the template's end-of-turn token, pad fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selfexplore.data.preference import PreferenceDataset
from selfexplore.data.sft import tokenize_sft
from selfexplore.models import load_tokenizer
from selfexplore.models.chat import PromptFormat, completion_end_id
from selfexplore.tasks import get_task

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def task():
    return get_task("arith", train_size=8, validation_size=2, test_size=2)


@pytest.fixture(scope="module")
def raw_tokenizer(tiny_arith_model: Path):
    return load_tokenizer(tiny_arith_model)


def chat_tokenizer(folder: Path, template: str):
    """The tiny tokenizer (which adds BOS `<s>`) with ChatML special tokens and `template`."""
    tok = load_tokenizer(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def chatml(tiny_arith_model: Path):
    return chat_tokenizer(tiny_arith_model, CHATML)


def test_raw_is_the_paper_prompt(task, raw_tokenizer) -> None:
    problem = task.load("train")[0]
    assert PromptFormat().prompter(task)(problem) == task.prompt(problem)
    assert PromptFormat().prompter(task, raw_tokenizer)(problem) == problem.question.strip() + "\n"


def test_chat_prompt_ends_with_generation_prompt(task, chatml) -> None:
    problem = task.load("train")[0]
    text = PromptFormat(chat_template=True).prompter(task, chatml)(problem)
    assert text == f"<|im_start|>user\n{problem.question.strip()}<|im_end|>\n<|im_start|>assistant\n"
    ids = chatml(text).input_ids
    assert ids[0] == chatml.bos_token_id and ids.count(chatml.bos_token_id) == 1
    assert chatml.convert_ids_to_tokens(ids[1]) == "<|im_start|>"  # parsed as the special token


def test_system_prompt(task, chatml) -> None:
    text = PromptFormat(chat_template=True, system_prompt="Solve it.").render("2 + 2?\n", chatml)
    assert text.startswith("<|im_start|>system\nSolve it.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>")
    with pytest.raises(ValueError, match="system_prompt needs chat_template"):
        PromptFormat(system_prompt="Solve it.")


def test_template_bos_is_not_doubled(tiny_arith_model: Path) -> None:
    tok = chat_tokenizer(tiny_arith_model, "{{ bos_token }}" + CHATML)
    text = PromptFormat(chat_template=True).render("1 + 1?", tok)
    assert not text.startswith(tok.bos_token)
    assert tok(text).input_ids.count(tok.bos_token_id) == 1


def test_missing_template_is_an_error(task, raw_tokenizer) -> None:
    with pytest.raises(ValueError, match="has no chat template.*chat_template: false"):
        PromptFormat(chat_template=True).prompter(task, raw_tokenizer)
    with pytest.raises(ValueError, match="has no chat template"):
        PromptFormat(chat_template=True).prompter(task, None)


def test_completion_end_token(raw_tokenizer, chatml) -> None:
    assert completion_end_id(raw_tokenizer) == raw_tokenizer.eos_token_id
    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    assert completion_end_id(chatml) == im_end != chatml.eos_token_id


def test_training_appends_and_samplers_stop_on_the_end_token(tiny_arith_model: Path, chatml, tmp_path: Path) -> None:
    from selfexplore.models import ModelSpec, load_model
    from selfexplore.sampling.hf import HFSampler

    im_end = chatml.convert_tokens_to_ids("<|im_end|>")
    [example], _ = tokenize_sft(chatml, [("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", "12 + 7 = 19")],
                                max_length=128, include_prompt=False, overlong="drop")
    assert example.labels[-1] == example.input_ids[-1] == im_end

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
                                 "chosen": "The answer is 3", "rejected": "The answer is 4"}) + "\n")
    item = PreferenceDataset.from_jsonl(pairs, chatml, max_length=64, max_prompt_length=32)[0]
    assert item["chosen_ids"][-1] == item["rejected_ids"][-1] == im_end

    model = load_model(ModelSpec(path=str(tiny_arith_model)), for_training=False)
    sampler = HFSampler(model, chatml)
    assert set(sampler.eos_ids.tolist()) == {chatml.eos_token_id, im_end}


def test_pad_fallback_is_eos(tiny_arith_model: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_arith_model)
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "nopad")
    with pytest.warns(UserWarning, match="no pad token; using eos"):
        reloaded = load_tokenizer(tmp_path / "nopad")
    assert reloaded.pad_token_id == reloaded.eos_token_id


def test_sample_stage_and_sft_data_use_the_format(task, chatml, tmp_path: Path) -> None:
    from selfexplore.data.sft import SFTDataModule
    from selfexplore.sampling import SamplingConfig, run_sample_stage
    from selfexplore.shards import StageContext

    class Echo:
        generated_tokens = 0

        def generate(self, prompts, n, draws, seed):
            return [["The answer is 0"] * n for _ in prompts]

    fmt = PromptFormat(chat_template=True)
    problems = task.load("train")[:2]
    run_sample_stage(Echo(), task, problems, tmp_path / "s.jsonl", SamplingConfig(n=1),
                     StageContext(prompt=fmt.prompter(task, chatml)), progress=False)
    records = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert all(r["prompt"].startswith("<|im_start|>user\n") for r in records)

    chatml.save_pretrained(tmp_path / "tok")
    data = SFTDataModule(task="arith", task_options={"train_size": 8, "validation_size": 2, "test_size": 2},
                         tokenizer_path=str(tmp_path / "tok"), prompt_format=fmt, val_limit=2)
    data.setup("fit")
    assert data.train_set.examples[0].input_ids[-1] == chatml.convert_tokens_to_ids("<|im_end|>")
    batch = data._collate_eval(data.eval_problems["validation"])
    assert all(p.endswith("<|im_end|>\n<|im_start|>assistant\n") for p in batch["prompts"])


def test_pipeline_refuses_chat_template_for_scratch_models() -> None:
    from selfexplore.models import TinyLlamaConfig
    from selfexplore.pipeline.config import PipelineConfig

    with pytest.raises(ValueError, match="from_scratch has none"):
        PipelineConfig(from_scratch=TinyLlamaConfig(), prompt_format=PromptFormat(chat_template=True))
