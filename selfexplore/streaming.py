"""Completion streams: requests go in as soon as they are known, results come out as they finish.

The first-pit search learns what to sample next only from what it just sampled (a step's next
try, a rationale's next step). Sending each such wave to `Sampler.generate` and waiting for
all of it leaves an engine nearly idle at the end of every wave, while its slowest completions
finish. A stream takes requests at any time and returns each one when its own rows are done,
so the caller can submit follow-ups at once and the engine stays full (vLLM: continuous
batching, `VLLMSampler.open_stream`). Any other sampler gets `BatchedStream`, which sends
queued requests to `generate` in calls of about `batch_size` rows.

Every row has its own seed, so what a request draws never depends on which other requests
shared its batch: scheduling changes when a completion is drawn, never which one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # typing only: explore and this module stay torch-free
    from selfexplore.sampling.base import DrawParams, Sampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """A request whose rows are all done: one completion per seed, or None and why not."""

    key: Hashable
    completions: list[str] | None
    tokens: int
    failure: str = ""


@dataclass
class StreamCounters:
    """What a stream cost: engine calls (HF `generate` calls, or vLLM engine steps) and the rows they
    carried, so a run can show how full the engine was (`occupancy`)."""

    calls: int = 0
    rows: int = 0
    capacity: int = 1

    @property
    def occupancy(self) -> float:
        """Mean rows per call over what one call can hold (1.0: every call full)."""
        return self.rows / (self.calls * self.capacity) if self.calls else 0.0


@runtime_checkable
class CompletionStream(Protocol):
    """Requests in at any time, finished requests out in the order they finish.

    `reproducible_batches`: whether the engine's batches are a function of what was submitted
    (a `generate` call per batch) rather than of its timing and state (continuous batching).
    Batch composition moves logits by float rounding (padding, kernel shapes), so where it is
    reproducible the search keeps each batch within one chunk, and a chunk's records are then
    byte-identical whatever else the rank explores (any world size, any resume); where it is
    not, chunks overlap to keep the engine full.
    """

    counters: StreamCounters
    reproducible_batches: bool

    @property
    def capacity(self) -> int:
        """Rows the engine works on at once (HF: batch_size; vLLM: max_num_seqs)."""
        ...

    @property
    def pending_rows(self) -> int:
        """Rows submitted and not yet returned."""
        ...

    def submit(self, key: Hashable, prompt: str, seeds: Sequence[int]) -> None:
        """Queue one completion of `prompt` per seed, returned together under `key`."""
        ...

    def collect(self) -> list[Finished]:
        """Work until at least one request is finished and return the finished ones ([] when none is pending)."""
        ...

    def close(self) -> None:
        """Drop what is still pending (an engine must not keep a stopped search's requests)."""
        ...


def _one_text(row: object) -> bool:
    return isinstance(row, list) and len(row) == 1 and isinstance(row[0], str)


def _exact_tokens(texts: list[str]) -> int | None:
    """Generated tokens of these completions when each says how many it took (`Completion.tokens`)."""
    counts = [getattr(x, "tokens", None) for x in texts]
    return None if None in counts else sum(counts)


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


class BatchedStream:
    """A stream over any `Sampler`: queued requests go to `generate` in calls of about `capacity` rows.

    Whole requests only (a request's rows stay in one call), first in first out. A call that
    fails is retried request by request, so one bad prompt costs only its own request; the
    rows' own seeds make a retried request draw what it would have drawn in the big call.
    Tokens: exact per request when the sampler's completions carry `tokens` (both backends),
    else the call's `generated_tokens` shared by text length.
    """

    reproducible_batches = True  # a call holds what was queued, in order: a function of the requests

    def __init__(self, sampler: Sampler, draws: DrawParams, capacity: int | None = None) -> None:
        self.sampler, self.draws = sampler, draws
        self._capacity = max(1, capacity if capacity is not None else int(getattr(sampler, "batch_size", 64)))
        self.queue: deque[tuple[Hashable, str, list[int]]] = deque()
        self.counters = StreamCounters(capacity=self._capacity)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending_rows(self) -> int:
        return sum(len(seeds) for _, _, seeds in self.queue)

    def submit(self, key: Hashable, prompt: str, seeds: Sequence[int]) -> None:
        self.queue.append((key, prompt, list(seeds)))

    def close(self) -> None:
        self.queue.clear()

    def collect(self) -> list[Finished]:
        batch = []
        rows = 0
        while self.queue and (not batch or rows + len(self.queue[0][2]) <= self._capacity):
            batch.append(self.queue.popleft())
            rows += len(batch[-1][2])
        return self._run(batch) if batch else []

    def _run(self, batch: list[tuple[Hashable, str, list[int]]]) -> list[Finished]:
        prompts = [prompt for _, prompt, seeds in batch for _ in seeds]
        seeds = [seed for _, _, row_seeds in batch for seed in row_seeds]
        before = self.sampler.generated_tokens
        self.counters.calls += 1
        self.counters.rows += len(prompts)
        try:
            out = self.sampler.generate(prompts, n=1, draws=self.draws, seed=seeds)
            failure = "" if isinstance(out, list) and len(out) == len(prompts) else "no_completions"
        except Exception as err:  # the sampler's failure becomes a counted status of its requests
            log.warning("sampler failed on %d prompt(s): %s: %s", len(prompts), type(err).__name__, err)
            out, failure = None, "sampler_error"
        tokens = self.sampler.generated_tokens - before
        if failure:
            if len(batch) > 1:
                return [done for request in batch for done in self._run([request])]
            return [Finished(batch[0][0], None, tokens, failure)]
        rows_out = iter(out)
        blocks = [[next(rows_out) for _ in row_seeds] for _, _, row_seeds in batch]
        texts = [[row[0] for row in block] if all(_one_text(row) for row in block) else None for block in blocks]
        exact = [_exact_tokens(block) if block is not None else None for block in texts]
        shared = share_tokens(tokens, [sum(len(x) + 1 for x in block) if block is not None else 0 for block in texts])
        return [Finished(key, block, exact_tokens if exact_tokens is not None else share,
                         "" if block is not None else "no_completions")
                for (key, _, _), block, exact_tokens, share in zip(batch, texts, exact, shared)]


def open_stream(sampler: Sampler, draws: DrawParams) -> CompletionStream:
    """The sampler's own stream when it has one (vLLM's engine), else `BatchedStream` over `generate`;
    every row of it is drawn as `draws` says (rows differ only by their seeds)."""
    opener = getattr(sampler, "open_stream", None)
    return opener(draws) if callable(opener) else BatchedStream(sampler, draws)
