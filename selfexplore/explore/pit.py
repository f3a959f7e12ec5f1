"""First-pit search: where does a wrong rationale stop being recoverable?

For t = 1, 2, ... k completions are sampled from a rejected rationale's step prefix s_1..s_t;
the first pit is the first t at which none reaches the gold answer (Hwang et al. 2024).
"exhaustive" is the paper's search; "adaptive" (default) draws a step's k tries in waves and
stops at its first success, which saves tokens without changing the pit distribution. Bad
input becomes a counted "skipped:*" status, never a crash.

Design notes: docs/design.md#first-pit-search
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from selfexplore.completion import is_finished
from selfexplore.explore.config import ExploreConfig
from selfexplore.hashing import derive_seed

if TYPE_CHECKING:  # typing only: importing them would pull torch and the graders into every use
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Task

log = logging.getLogger(__name__)

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


def _is_one_text(row: object) -> bool:
    return isinstance(row, list) and len(row) == 1 and isinstance(row[0], str)


def share_tokens(total: int, weights: Sequence[int]) -> list[int]:
    """Split `total` proportionally to `weights` into integers that add up to `total`."""
    if not weights:
        return []
    wsum = sum(weights)
    if wsum <= 0:
        weights, wsum = [1] * len(weights), len(weights)
    exact = [total * w / wsum for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


@dataclass
class _Prefix:
    """One explored prefix: its draws so far and who pays for them."""

    prompt: str
    steps_text: str
    gold: str
    owner: int
    completions: list[str] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)
    waves: int = 0
    tokens: int = 0
    failure: str | None = None


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


class _Search:
    """State of one chunk's search: jobs, the prefix cache and the sampler calls."""

    def __init__(self, rationales: Sequence[Rationale], sampler: Sampler, task: Task,
                 config: ExploreConfig, chunk_index: int) -> None:
        self.sampler, self.task, self.config, self.chunk = sampler, task, config, chunk_index
        self.waves = config.wave_sizes()
        self.adaptive = config.mode == "adaptive"
        self.cache: dict[tuple[Any, str], _Prefix] = {}
        self.jobs: list[_Job] = []
        for i, r in enumerate(rationales):
            steps, reason = check_rationale(task, r)
            self.jobs.append(_Job(i, r, steps, status=reason))

    def _done(self, p: _Prefix) -> bool:
        return (p.failure is not None or len(p.completions) >= self.config.k
                or (self.adaptive and any(p.correct)))

    def _prefix(self, job: _Job) -> _Prefix:
        """The job's current prefix, shared within a question in adaptive mode."""
        steps_text = steps_prefix(job.steps, job.t)
        prompt = job.rationale.prompt + steps_text
        key = (job.rationale.question_id if self.adaptive else job.index, prompt)
        p = self.cache.get(key)
        if p is None:
            p = _Prefix(prompt, steps_text, job.rationale.gold, job.index)
            self.cache[key] = p
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

    def run(self) -> list[dict[str, Any]]:
        wave = 0
        while True:
            pending: dict[int, _Prefix] = {}
            for job in self.jobs:
                p = self._advance(job)
                if p is not None:
                    pending.setdefault(id(p), p)
            if not pending:
                break
            draws = [(p, min(self.waves[min(p.waves, len(self.waves) - 1)], self.config.k - len(p.completions)))
                     for p in pending.values()]
            self._draw(draws, derive_seed(self.config.seed or 0, self.chunk, wave, bits=31))
            wave += 1
        return [self._record(job) for job in self.jobs]

    def _call(self, prompts: list[str], seed: int) -> tuple[list[list[str]] | None, int, str]:
        """One generate call, n=1: (outputs or None on failure, tokens it cost, failure reason)."""
        before = self.sampler.generated_tokens
        c = self.config
        try:
            out = self.sampler.generate(prompts, n=1, temperature=c.temperature, top_p=c.top_p,
                                        max_new_tokens=c.new_tokens(), stop=c.stop, seed=seed)
        except Exception as err:  # the sampler's failure becomes a counted status (module doc)
            log.warning("sampler failed on %d prompt(s): %s: %s", len(prompts), type(err).__name__, err)
            return None, self.sampler.generated_tokens - before, "sampler_error"
        tokens = self.sampler.generated_tokens - before
        if not isinstance(out, list) or len(out) != len(prompts):
            return None, tokens, "no_completions"
        return out, tokens, ""

    def _draw(self, draws: list[tuple[_Prefix, int]], seed: int) -> None:
        """Draw `count` more completions for each prefix, all in one call (prompt repeated)."""
        prompts = [p.prompt for p, count in draws for _ in range(count)]
        out, tokens, reason = self._call(prompts, seed)
        if out is None:
            for (p, _), share in zip(draws, share_tokens(tokens, [count for _, count in draws])):
                p.tokens += share
            if len(draws) == 1:
                draws[0][0].failure = reason
                return
            for i, draw in enumerate(draws):
                self._draw([draw], derive_seed(seed, "retry", i, bits=31))
            return
        rows = iter(out)
        got = [[next(rows) for _ in range(count)] for _, count in draws]
        texts = [[row[0] for row in block] if all(_is_one_text(row) for row in block) else None for block in got]
        weights = [sum(len(x) + 1 for x in block) if block is not None else 0 for block in texts]
        for (p, _), block, share in zip(draws, texts, share_tokens(tokens, weights)):
            p.tokens += share
            p.waves += 1
            if block is None:
                p.failure = "no_completions"
                continue
            p.completions.extend(block)
            p.correct.extend(self.task.is_correct(p.steps_text + x, p.gold) for x in block)

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


def find_first_pits(rationales: Sequence[Rationale], sampler: Sampler, task: Task,
                    config: ExploreConfig | None = None, chunk_index: int = 0) -> list[dict[str, Any]]:
    """Explore rationales (one batch, e.g. a stage chunk) and return one explore record each.

    Records follow the `explore.jsonl` schema, in input order; `chunk_index` enters every seed.
    """
    return _Search(rationales, sampler, task, config or ExploreConfig(), chunk_index).run()
