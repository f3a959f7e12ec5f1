"""First-pit search: where does a wrong rationale stop being recoverable?

For t = 1, 2, ... k completions are sampled from a rejected rationale's step prefix s_1..s_t;
the first pit is the first t at which none reaches the gold answer (Hwang et al. 2024).
"exhaustive" is the paper's search; "adaptive" (default) draws a step's k tries in waves and
stops at its first success, which saves tokens without changing the pit distribution. Bad
input becomes a counted "skipped:*" status, never a crash.

Design notes: docs/design.md#first-pit-search
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selfexplore.completion import is_finished
from selfexplore.explore.config import ExploreConfig
from selfexplore.hashing import derive_seed
from selfexplore.sampling.base import resolve_seed
from selfexplore.streaming import CompletionStream, Finished, open_stream

if TYPE_CHECKING:  # typing only: importing them would pull torch and the graders into every use
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Task

STEP_SEP = "\n"


@dataclass(frozen=True)
class Rationale:
    """A rejected rationale to explore, with what the granular pairs need later."""

    sample_id: str
    question_id: str
    prompt: str
    gold: str
    text: str
    pair_chosen: str
    ends: bool = True  # False: the sample was cut at max_new_tokens, so its last step ends nothing


def steps_prefix(steps: Sequence[str], t: int) -> str:
    """The rationale text of steps 1..t, ending with the newline the next step starts after."""
    return STEP_SEP.join(steps[:t]) + STEP_SEP


@dataclass(eq=False)  # identity-hashed: a prefix is its own stream key
class _Prefix:
    """One explored prefix: its draws so far, who pays for them, and the jobs waiting on it."""

    prompt: str
    steps_text: str
    gold: str
    owner: int
    scope: str  # what its draw seeds are keyed by besides the prompt: question (adaptive) or sample
    completions: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    waves: int = 0
    tokens: int = 0
    failure: str | None = None
    in_flight: bool = False
    waiters: list[_Job] = field(default_factory=list)


@dataclass
class _Job:
    index: int
    rationale: Rationale
    steps: list[str]
    status: str | None = None
    t: int = 1
    pit: int | None = None
    visited: list[_Prefix] = field(default_factory=list)


def check_rationale(task: Task, r: Rationale) -> tuple[list[str], str | None]:
    """Steps of a rationale and the reason it cannot be explored (None when it can)."""
    steps = task.split_steps(r.text)
    if not steps:
        return steps, "skipped:no_steps"
    if any(not s.strip() for s in steps):
        return steps, "skipped:empty_step"
    if len(steps) == 1:
        return steps, "skipped:single_step"
    if task.extract_answer(r.text) is None:
        return steps, "skipped:no_answer"
    if task.is_correct(r.text, r.gold):
        return steps, "skipped:not_wrong"
    return steps, None


class _ChunkSearch:
    """One chunk's search as events: `start` and `deliver` return the prefixes that need a draw.

    A job waits on its current prefix; when the prefix is decided (a success, k failures, or a
    sampler failure) every job waiting on it moves on, in input order. Each draw's seed is a
    function of (seed, scope, prefix, draw number) only, so the records do not depend on the
    order in which an engine returns the draws, nor on chunking or world size.
    """

    def __init__(self, rationales: Sequence[Rationale], task: Task, config: ExploreConfig) -> None:
        self.task, self.config, self.seed = task, config, resolve_seed(config.seed)
        self.waves = config.wave_sizes()
        self.adaptive = config.mode == "adaptive"
        self.cache: dict[tuple[str, str], _Prefix] = {}
        self.in_flight = 0
        self.jobs: list[_Job] = []
        for i, r in enumerate(rationales):
            steps, reason = check_rationale(task, r)
            self.jobs.append(_Job(i, r, steps, status=reason))

    @property
    def finished(self) -> bool:
        return self.in_flight == 0

    def start(self) -> list[_Prefix]:
        return [p for job in self.jobs for p in self._wait(job)]

    def draw(self, p: _Prefix) -> list[int]:
        """Seeds of the prefix's next wave of draws (one completion per seed)."""
        size = self.waves[min(p.waves, len(self.waves) - 1)]
        first = len(p.completions)
        return [derive_seed(self.seed, "draw", p.scope, p.prompt, j, bits=31)
                for j in range(first, min(first + size, self.config.k))]

    def deliver(self, p: _Prefix, done: Finished) -> list[_Prefix]:
        """Take a wave's completions (or its failure); return the prefixes that now need a draw."""
        self.in_flight -= 1
        p.in_flight = False
        p.tokens += done.tokens
        if done.completions is None:
            p.failure = done.failure or "no_completions"
        else:
            p.waves += 1
            p.completions.extend(done.completions)
            p.correct.extend(self.task.is_correct(p.steps_text + x, p.gold) for x in done.completions)
        if not self._done(p):
            return self._send(p)
        waiters, p.waiters = p.waiters, []
        return [q for job in waiters for q in self._wait(job)]

    def records(self) -> list[dict[str, Any]]:
        return [self._record(job) for job in self.jobs]

    def _send(self, p: _Prefix) -> list[_Prefix]:
        p.in_flight = True
        self.in_flight += 1
        return [p]

    def _wait(self, job: _Job) -> list[_Prefix]:
        """Move the job on; the prefix it now waits on when that needs a draw ([] otherwise)."""
        p = self._advance(job)
        if p is None:
            return []
        p.waiters.append(job)
        return [] if p.in_flight else self._send(p)

    def _done(self, p: _Prefix) -> bool:
        return (p.failure is not None or len(p.completions) >= self.config.k
                or (self.adaptive and any(p.correct)))

    def _prefix(self, job: _Job) -> _Prefix:
        """The job's current prefix, shared within a question in adaptive mode."""
        steps_text = steps_prefix(job.steps, job.t)
        prompt = job.rationale.prompt + steps_text
        scope = job.rationale.question_id if self.adaptive else job.rationale.sample_id
        p = self.cache.get((scope, prompt))
        if p is None:
            p = _Prefix(prompt, steps_text, job.rationale.gold, job.index, scope)
            self.cache[(scope, prompt)] = p
        if len(job.visited) < job.t:
            job.visited.append(p)
        return p

    def _advance(self, job: _Job) -> _Prefix | None:
        """Move a job past decided steps; return the prefix it waits on, or None when finished."""
        limit = min(len(job.steps), self.config.max_steps)
        while job.status is None:
            p = self._prefix(job)
            if not self._done(p):
                return p
            if p.failure is not None:
                job.status = f"skipped:{p.failure}"
            elif any(p.correct):
                if job.t >= limit:
                    job.status = "no_pit"
                else:
                    job.t += 1
            else:
                job.status, job.pit = "pit", job.t
        return None

    def _record(self, job: _Job) -> dict[str, Any]:
        r = job.rationale
        return {
            "sample_id": r.sample_id, "question_id": r.question_id, "prompt": r.prompt,
            "gold": r.gold, "steps": job.steps,
            "outcomes": [{"step": t, "completions": list(p.completions), "correct": list(p.correct),
                          "finished": [is_finished(x) for x in p.completions]}
                         for t, p in enumerate(job.visited, start=1)],
            "pit": job.pit, "status": job.status,
            "tokens_generated": sum(p.tokens for p in job.visited if p.owner == job.index),
            "pair_chosen": r.pair_chosen, "rejected_ends": r.ends,
        }


def explore_chunks(chunks: Sequence[tuple[int, Sequence[Rationale]]], sampler: Sampler, task: Task,
                   config: ExploreConfig, stream: CompletionStream | None = None
                   ) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """Search chunks (index, rationales) and yield (index, records) as each chunk finishes.

    `config.schedule="stream"` submits every draw as soon as it is known; on an engine with
    continuous batching (`reproducible_batches` False: vLLM) it also opens the next chunk while
    fewer than two engine-loads of rows are pending, so the engine stays full across steps and
    chunks. Over `generate` calls (HF) chunks are explored one at a time, so no call mixes two
    chunks and a chunk's records do not depend on which others the rank has (world size,
    resume). "waves" waits for each wave of draws to come back before sending the next and
    explores one chunk at a time (the former schedule, kept to measure against:
    bench/bench_explore_schedule.py). All draw with the same seeds (one per draw).
    """
    own_stream = stream is None
    stream = stream or open_stream(sampler, config.draws())
    streaming = config.schedule == "stream"
    overlap = streaming and not stream.reproducible_batches
    todo = deque(chunks)
    searches: dict[int, _ChunkSearch] = {}
    held: list[tuple[int, _Prefix]] = []

    def send(index: int, prefixes: list[_Prefix]) -> None:
        for p in prefixes:
            stream.submit((index, p), p.prompt, searches[index].draw(p))

    try:
        while todo or searches:
            while todo and (not searches or (overlap and stream.pending_rows < 2 * stream.capacity)):
                index, rationales = todo.popleft()
                searches[index] = _ChunkSearch(rationales, task, config)
                send(index, searches[index].start())
            for index in [i for i, search in searches.items() if search.finished]:
                yield index, searches.pop(index).records()
            if not searches:
                continue
            if held and not stream.pending_rows:  # "waves": the wave is back, send the next one
                for index, p in held:
                    send(index, [p])
                held = []
            if not stream.pending_rows:
                raise RuntimeError("explore: prefixes wait on draws that were never sent (a bug)")
            for done in stream.collect():
                index, p = done.key
                follow = searches[index].deliver(p, done)
                if streaming:
                    send(index, follow)
                else:
                    held.extend((index, q) for q in follow)
    finally:
        if own_stream:
            stream.close()


def find_first_pits(rationales: Sequence[Rationale], sampler: Sampler, task: Task,
                    config: ExploreConfig | None = None) -> list[dict[str, Any]]:
    """Explore rationales (one batch) and return one explore record each.

    Records follow the `explore.jsonl` schema, in input order.
    """
    ((_, records),) = explore_chunks([(0, rationales)], sampler, task, config or ExploreConfig())
    return records
