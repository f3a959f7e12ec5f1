"""Data-parallel units: every rank samples / explores the shards it owns, rank 0 merges.

Ranks here are threads of one process, each with its own `Workers` (rank, world size) and its
own sampler: they coordinate only through the shard folder, as processes on several nodes do,
without paying a process start per rank. The killed-rank test runs real processes (this file
is their entry point), as does `test_pipeline_distributed` for the whole pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from test_explore import TASK as EXPLORE_TASK
from test_explore import RandomSampler, write_pairs
from test_memory import _fake_vllm, fake_cuda  # noqa: F401 (a fixture)

from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.stage import run_explore_stage
from selfexplore.io import read_json
from selfexplore.models import load_tokenizer
from selfexplore.ranks import Workers
from selfexplore.sampling import SamplingConfig, get_sampler, run_sample_stage
from selfexplore.sampling.base import DrawParams, SamplerBase, prompt_seed
from selfexplore.shards import StageContext
from selfexplore.tasks.base import Problem, Task

SAMPLING = SamplingConfig(n=2, temperature=1.0, max_new_tokens=8, seed=3, shard_size=2)
PROBLEMS = [Problem(id=f"q{i:02d}", question=f"{i} + 1 = ?", solution="", answer=str(i + 1)) for i in range(9)]


class _Echo(Task):
    name = "echo"

    def load(self, split: str, path: str | None = None) -> list[Problem]:
        raise NotImplementedError

    def split_steps(self, text: str) -> list[str]:
        return text.splitlines()

    def extract_answer(self, text: str) -> str | None:
        return text.rsplit(" ", 1)[-1] or None

    def is_correct(self, text: str, gold: str) -> bool:
        return self.extract_answer(text) == gold


class SeededSampler(SamplerBase):
    """Completions that depend only on (seed, prompt, sample index), like a seeded engine;
    records the seeds it was called with and can die after `dies_after` calls (a killed rank)."""

    def __init__(self, dies_after: int | None = None) -> None:
        self.seeds: list[int] = []
        self.dies_after = dies_after
        self.generated_tokens = 0

    def generate(self, prompts: Sequence[str], n: int, draws: DrawParams, seed: int) -> list[list[str]]:
        if self.dies_after is not None and len(self.seeds) == self.dies_after:
            raise RuntimeError("simulated kill of this rank")
        self.seeds.append(seed)
        out = []
        for prompt in prompts:
            digest = [hashlib.sha256(f"{seed}|{prompt}|{k}".encode()).digest()[0] for k in range(n)]
            out.append([f"so the answer is {int(prompt.split(' ')[0]) + 1 + d % 2}" for d in digest])
        self.generated_tokens += n * len(prompts)
        return out


def _ranks(world: int, run: Callable[[Workers], object]) -> list[BaseException | None]:
    """Run `run` for ranks 0..world-1 side by side; returns each rank's exception (or None)."""
    errors: list[BaseException | None] = [None] * world

    def target(rank: int) -> None:
        try:
            run(Workers(rank=rank, world_size=world))
        except BaseException as error:  # noqa: BLE001 (reported to the test)
            errors[rank] = error

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return errors


def _sample(out: Path, workers: Workers, sampler: SeededSampler | None = None) -> object:
    return run_sample_stage(sampler or SeededSampler(), _Echo(), PROBLEMS, out, SAMPLING,
                            StageContext(model="m", workers=workers), progress=False)


def test_two_ranks_write_their_own_shards_and_merge_to_the_one_rank_file(tmp_path: Path) -> None:
    _sample(tmp_path / "one" / "samples.jsonl", Workers())
    samplers = {0: SeededSampler(), 1: SeededSampler()}
    assert _ranks(2, lambda w: _sample(tmp_path / "two" / "samples.jsonl", w, samplers[w.rank])) == [None, None]
    merged = (tmp_path / "two" / "samples.jsonl").read_bytes()
    assert merged == (tmp_path / "one" / "samples.jsonl").read_bytes()
    shards = tmp_path / "two" / "samples.shards"
    for i in range(5):  # 9 questions in shards of 2
        assert read_json(shards / f"{i:05d}.meta.json")["rank"] == i % 2, i
    assert len(samplers[0].seeds) == 3 and len(samplers[1].seeds) == 2  # each sampled its own shards only
    assert not set(samplers[0].seeds) & set(samplers[1].seeds)


def test_a_failed_rank_fails_the_unit_on_rank_zero_and_a_rerun_redoes_only_the_missing_shards(
        tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    dying = {0: SeededSampler(), 1: SeededSampler(dies_after=1)}
    errors = _ranks(2, lambda w: _sample(out, w, dying[w.rank]))
    assert "simulated kill" in str(errors[1])
    assert isinstance(errors[0], RuntimeError) and "rank 1" in str(errors[0]) and "simulated kill" in str(errors[0])
    assert not out.exists()
    rerun = SeededSampler()  # world size 1 now: continues where the two ranks stopped
    stats = _sample(out, Workers(), rerun)
    assert len(rerun.seeds) == 1 and stats.resumed_shards == 4  # rank 1's second shard only
    _sample(tmp_path / "ref" / "samples.jsonl", Workers())
    assert out.read_bytes() == (tmp_path / "ref" / "samples.jsonl").read_bytes()


def test_a_world_size_that_does_not_divide_the_shards_and_a_resume_with_another(tmp_path: Path) -> None:
    out = tmp_path / "samples.jsonl"
    errors = _ranks(3, lambda w: _sample(out, w, SeededSampler(dies_after=0 if w.rank == 2 else None)))
    assert errors[2] is not None and errors[0] is not None
    assert _ranks(2, lambda w: _sample(out, w)) == [None, None]
    _sample(tmp_path / "ref" / "samples.jsonl", Workers())
    assert out.read_bytes() == (tmp_path / "ref" / "samples.jsonl").read_bytes()


@pytest.mark.parametrize("tamper", ["edit a completion", "flip a grade", "duplicate a record"])
def test_a_shard_changed_after_it_was_written_is_redone_never_merged(tmp_path: Path, tamper: str) -> None:
    out = tmp_path / "samples.jsonl"
    _sample(out, Workers())
    expected = out.read_bytes()
    shard = tmp_path / "samples.shards" / "00001.jsonl"
    lines = shard.read_text().splitlines()
    first = json.loads(lines[0])
    if tamper == "edit a completion":
        first["completion"] = "so the answer is 999"
    elif tamper == "flip a grade":
        first["correct"] = not first["correct"]
    lines = [json.dumps(first), *lines[1:]] if tamper != "duplicate a record" else [lines[0], lines[0], *lines[2:]]
    shard.write_text("".join(line + "\n" for line in lines))  # same number of records as its meta says
    rerun = SeededSampler()
    stats = _sample(out, Workers(), rerun)
    assert len(rerun.seeds) == 1 and stats.resumed_shards == 4  # the changed shard only is sampled again
    assert out.read_bytes() == expected


class BatchVariantSampler(RandomSampler):
    """Like a real engine, a draw also depends on what shares its call (padding, kernel shapes and
    float rounding), here on the call's size: only equal calls give equal draws."""

    def generate(self, prompts, n, draws, seed):
        size = len(prompts)
        return super().generate(prompts, n, draws,
                                [hash((s, size)) & 0xFFFFFFFF for s in (prompt_seed(seed, i)[0] for i in range(size))])


@pytest.mark.parametrize("sampler", [RandomSampler, BatchVariantSampler])
def test_exploration_on_two_ranks_equals_one(tmp_path: Path, sampler: type) -> None:
    problems = write_pairs(tmp_path / "pairs.jsonl")
    config = ExploreConfig(chunk_size=2, seed=11)

    def explore(out: Path, workers: Workers) -> object:
        return run_explore_stage(sampler(), EXPLORE_TASK, tmp_path / "pairs.jsonl", problems, out, config,
                                 StageContext(workers=workers))

    explore(tmp_path / "one", Workers())
    assert _ranks(2, lambda w: explore(tmp_path / "two", w)) == [None, None]
    for name in ("explore.jsonl", "gpairs.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    ranks = {read_json(p)["rank"] for p in (tmp_path / "two" / "explore_shards").glob("chunk_*.meta.json")}
    assert ranks == {0, 1}


def test_each_ranks_vllm_engine_sees_only_its_own_gpu(tiny_arith_model: Path, fake_cuda: list[str],  # noqa: F811
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    modules = _fake_vllm(load_tokenizer(str(tiny_arith_model)), fake_cuda)
    original = modules["vllm"].LLM.__init__

    def record(self, *args, **kwargs):
        import os

        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES", "all"))
        original(self, *args, **kwargs)

    modules["vllm"].LLM.__init__ = record
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # the job's GPUs on this node
    for local_rank in (0, 1, 3):
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        get_sampler(SamplingConfig(backend="vllm", gpu_memory_utilization=0.5), str(tiny_arith_model),
                    local_rank=local_rank)
    import os

    assert seen == ["4", "5", "7"] and os.environ["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


class _KilledRankSampler(SeededSampler):
    """Kills its own process (SIGKILL: no failure record, no cleanup) at call `dies_after`."""

    def generate(self, *args, **kwargs):
        if self.dies_after is not None and len(self.seeds) == self.dies_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().generate(*args, **kwargs)


def _rank_process(out: Path, dies_after: int | None, log: Path) -> None:
    """One rank started as torchrun starts it (RANK / WORLD_SIZE): sample, then log its seeds."""
    sampler = _KilledRankSampler(dies_after)
    _sample(out, Workers.from_environment(), sampler)
    log.write_text(json.dumps(sampler.seeds))


def _start_rank(rank: int, out: Path, dies_after: int | None, log: Path) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(out), str(-1 if dies_after is None else dies_after),
                             str(log)], env=env, cwd=Path(__file__).parent)


@pytest.mark.slow
def test_a_rank_process_killed_mid_unit_and_a_rerun_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run" / "samples.jsonl"
    logs = [tmp_path / f"rank{r}.json" for r in range(2)]
    # Rank 1 owns shards 1 and 3 of 5: it writes shard 1 and is killed on shard 3.
    ranks = [_start_rank(0, out, None, logs[0]), _start_rank(1, out, 1, logs[1])]
    assert ranks[1].wait(timeout=120) == -signal.SIGKILL
    deadline = time.monotonic() + 60  # rank 0 finishes its own shards, then waits for shard 3
    while not all((out.parent / "samples.shards" / f"{i:05d}.meta.json").exists() for i in (0, 2, 4)):
        assert time.monotonic() < deadline and ranks[0].poll() is None, "rank 0 stopped or hung"
        time.sleep(0.1)
    assert ranks[0].poll() is None  # still waiting: a dead rank writes no failure record
    ranks[0].kill()  # what torchrun does to the other workers when one dies
    ranks[0].wait(timeout=30)
    shards = out.parent / "samples.shards"
    assert not out.exists() and sorted(p.name for p in shards.glob("*.meta.json")) == [
        f"{i:05d}.meta.json" for i in (0, 1, 2, 4)]

    rerun = [_start_rank(r, out, None, logs[r]) for r in range(2)]
    assert [p.wait(timeout=120) for p in rerun] == [0, 0]
    assert [len(json.loads(log.read_text())) for log in logs] == [0, 1]  # only the lost shard is drawn again
    _sample(tmp_path / "ref" / "samples.jsonl", Workers())
    assert out.read_bytes() == (tmp_path / "ref" / "samples.jsonl").read_bytes()
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == len(PROBLEMS) * SAMPLING.n


if __name__ == "__main__":  # a rank of the killed-rank test
    _rank_process(Path(sys.argv[1]), None if sys.argv[2] == "-1" else int(sys.argv[2]), Path(sys.argv[3]))
