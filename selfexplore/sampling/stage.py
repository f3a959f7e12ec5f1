"""The `sample` stage: N graded samples per question, written in resumable shards.

Sampling is the most expensive stage (paper: N=100 per train question), so a killed run
must resume where it stopped. Problems are sorted by id and cut into fixed shards; shard i
is sampled with a seed derived from (seed, i) and written atomically with a meta file beside
it (`selfexplore.shards.ShardFolder`: each rank writes its own shards, rank 0 merges). A rerun
skips finished shards, whatever the world size, so the assembled `samples.jsonl` is
byte-identical to that of an uninterrupted run, with no duplicates or gaps. The manifest
carries the config fingerprint; resuming with another model, n, seed, problem set, ... is
refused rather than silently mixing samples. Each record says whether its completion was
`finished` by the model or cut at max_new_tokens (pair builders treat the two differently).
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from selfexplore.completion import is_finished
from selfexplore.hashing import text_sha256
from selfexplore.io import atomic_open, iter_jsonl
from selfexplore.sampling.base import Sampler, SamplingConfig, derive_seed, resolve_backend, resolve_seed
from selfexplore.shards import Shard, ShardFolder, StageContext
from selfexplore.validation import raise_problems

if TYPE_CHECKING:  # typing only: keeps this stage importable without loading every task
    from selfexplore.tasks.base import Problem, Task

MANIFEST_FORMAT = 2  # 2: shard meta files beside the shards (any rank may write one)


@dataclass
class SampleStats:
    """What a sample stage produced; token and record counts cover all shards, times this run."""

    questions: int
    samples: int
    correct: int
    pass_rate_mean: float
    pass_at_n: float
    questions_without_samples: int
    generated_tokens: int
    shards: int
    resumed_shards: int
    backend_seconds: float
    total_seconds: float

    @property
    def overhead_fraction(self) -> float:
        """Share of this run's wall time spent outside the backend (grading, I/O, bookkeeping)."""
        return 0.0 if self.total_seconds <= 0 else 1.0 - self.backend_seconds / self.total_seconds

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overhead_fraction": self.overhead_fraction}


def shard_dir_for(out_path: str | Path) -> Path:
    """Where the shards of `out_path` live: `samples.jsonl` -> `samples.shards/`."""
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + ".shards")


def run_sample_stage(sampler: Sampler, task: Task, problems: Sequence[Problem], out_path: str | Path,
                     config: SamplingConfig, context: StageContext | None = None, *, backend_name: str | None = None,
                     settings: Mapping[str, Any] | None = None, progress: bool = True) -> SampleStats | None:
    """Sample `config.n` completions per problem, grade them with `task`, write `out_path` (JSONL).

    `config` gives n, temperature, top_p, max_new_tokens, stop, seed and shard_size (its engine fields
    belong to the sampler, already built); `backend_name` is the backend recorded with each
    sample (default: `config.backend`, resolved).

    `context` (`StageContext`, default: this process alone, task prompts): `model` names the
    policy (e.g. its checkpoint path) and `settings` holds anything else that identifies it (e.g.
    an adapter path); both go into the config fingerprint that guards resumption, with every
    sampling argument and the prompts (`context.prompt`, default `task.prompt`, the paper's raw
    prompt; `PromptFormat.prompter` gives the chat-template one), so a resume with another
    prompt format is refused unless `context.force`. With several `context.workers` each rank
    samples the shards it owns with the seeds of those shards and rank 0 merges, so the output
    is byte-identical for any world size; other ranks return None. Returns totals; `progress`
    shows a tqdm bar.
    """
    raise_problems(config.problems(), "sampling config")
    context = context or StageContext()
    shard_size = config.shard_size
    start = time.perf_counter()
    out_path = Path(out_path)
    ordered = sorted(problems, key=lambda p: p.id)
    duplicates = sorted({a.id for a, b in itertools.pairwise(ordered) if a.id == b.id})
    if duplicates:
        raise ValueError(f"duplicate problem ids: {duplicates[:5]}")
    prompts = [(context.prompt or task.prompt)(p) for p in ordered]
    n, seed, draws = config.n, resolve_seed(config.seed), config.draws()
    backend_name = backend_name or resolve_backend(config.backend)
    fingerprint = {
        "model": context.model, "backend": backend_name, "task": task.name, "n": n,
        "temperature": draws.temperature, "top_p": draws.top_p, "max_new_tokens": draws.max_new_tokens,
        "stop": list(config.stop) if config.stop else None, "seed": seed, "shard_size": shard_size,
        "settings": dict(settings or {}), "num_problems": len(ordered),
        "problems_sha256": _problems_hash(ordered, prompts),
    }
    folder = ShardFolder(shard_dir_for(out_path), "sample", fingerprint, MANIFEST_FORMAT, _shard_name, context)
    starts = range(0, len(ordered), shard_size)
    backend_seconds = 0.0

    def produce(mine: list[int]) -> Generator[Shard, None, None]:
        nonlocal backend_seconds
        with tqdm(total=sum(len(ordered[starts[i]:starts[i] + shard_size]) for i in mine), unit="q", desc="sample",
                  disable=not progress) as bar:
            for i in mine:
                part = slice(starts[i], starts[i] + shard_size)
                shard, shard_prompts = ordered[part], prompts[part]
                tokens_before = sampler.generated_tokens
                t0 = time.perf_counter()
                completions = sampler.generate(shard_prompts, n=n, draws=draws, seed=derive_seed(seed, "shard", i))
                seconds = time.perf_counter() - t0
                backend_seconds += seconds
                records = _grade(task, shard, shard_prompts, completions, n, backend_name, seed)
                yield i, records, {"questions": len(shard),
                                   "generated_tokens": sampler.generated_tokens - tokens_before,
                                   "backend_seconds": round(seconds, 3)}
                bar.update(len(shard))

    def merge() -> SampleStats:
        shard_paths = [folder.path(i) for i in range(len(starts))]
        _concatenate_atomically(shard_paths, out_path)
        metas = [folder.meta(i) for i in range(len(starts))]
        return _stats(shard_paths, ordered, metas, folder.resumed, backend_seconds, time.perf_counter() - start)

    return folder.run(len(starts), produce, merge)


def _grade(task: Task, shard: Sequence[Problem], prompts: Sequence[str], completions: list[list[str]],
           n: int, backend: str, seed: int) -> list[dict[str, Any]]:
    """One graded record per completion, in problem order then sample order."""
    if len(completions) != len(shard):
        raise RuntimeError(f"sampler returned {len(completions)} completion lists for {len(shard)} prompts")
    records = []
    for problem, prompt, texts in zip(shard, prompts, completions):
        if len(texts) not in (0, n):
            raise RuntimeError(f"sampler returned {len(texts)} completions for question {problem.id}, "
                               f"expected {n} (or 0 for a skipped prompt)")
        for k, text in enumerate(texts):
            records.append({
                "id": f"{problem.id}:{k}", "question_id": problem.id, "prompt": prompt, "completion": text,
                "answer": task.extract_answer(text), "gold": problem.answer,
                "correct": bool(task.is_correct(text, problem.answer)), "finished": is_finished(text),
                "backend": backend, "seed": seed,
            })
    return records


def _problems_hash(problems: Sequence[Problem], prompts: Sequence[str]) -> str:
    """Fingerprint of what is sampled and how it is graded (id, prompt, gold answer)."""
    payload = json.dumps([[p.id, q, p.answer] for p, q in zip(problems, prompts)], ensure_ascii=False)
    return text_sha256(payload)


def _shard_name(index: int) -> str:
    return f"{index:05d}.jsonl"


def _concatenate_atomically(parts: Sequence[Path], out_path: Path) -> None:
    """Stream the shard files into `out_path` so readers never see a partial file (no full copy in RAM)."""
    with atomic_open(out_path, "wb") as out:
        for part in parts:
            with part.open("rb") as f:
                shutil.copyfileobj(f, out)


def _stats(shard_paths: Sequence[Path], problems: Sequence[Problem], metas: Sequence[Mapping[str, Any]],
           resumed: int, backend_seconds: float, total_seconds: float) -> SampleStats:
    """Totals over every shard, streamed record by record (outputs can hold millions of samples)."""
    per_question: dict[str, list[int]] = {p.id: [0, 0] for p in problems}  # [samples, correct]
    for path in shard_paths:
        for _, record in iter_jsonl(path):
            counts = per_question[record["question_id"]]
            counts[0] += 1
            counts[1] += bool(record["correct"])
    sampled = [(k, c) for k, c in per_question.values() if k]
    return SampleStats(
        questions=len(problems), samples=sum(k for k, _ in sampled), correct=sum(c for _, c in sampled),
        pass_rate_mean=sum(c / k for k, c in sampled) / len(sampled) if sampled else 0.0,
        pass_at_n=sum(c > 0 for _, c in sampled) / len(sampled) if sampled else 0.0,
        questions_without_samples=len(problems) - len(sampled),
        generated_tokens=sum(int(m.get("generated_tokens", 0)) for m in metas),
        shards=len(metas), resumed_shards=resumed,
        backend_seconds=backend_seconds, total_seconds=total_seconds,
    )
