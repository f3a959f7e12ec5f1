"""Settings of the explore stage (first-pit search + granular pairs), one dataclass for the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, get_args

from selfexplore.sampling.base import DrawParams, knob_problems

Mode = Literal["adaptive", "exhaustive"]
Schedule = Literal["stream", "waves"]
RejectedMode = Literal["pit_step", "pit_to_end"]
MODES: tuple[str, ...] = get_args(Mode)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
REJECTED_MODES: tuple[str, ...] = get_args(RejectedMode)
PAPER_MAX_NEW_TOKENS = 512


def doubling_waves(k: int) -> tuple[int, ...]:
    """Wave sizes 1, 1, 2, 4, ... cut to sum to k: cheap first tries, big waves only on hard steps."""
    waves: list[int] = []
    size = 1
    while sum(waves) < k:
        waves.append(min(size, k - sum(waves)))
        size = size if len(waves) == 1 else size * 2
    return tuple(waves)


@dataclass
class ExploreConfig:
    """How rejected rationales are explored and turned into granular pairs.

    k, temperature: the paper's k=4 completions per step at temperature 0.7.
    max_new_tokens: tokens per completion at most; None (default): the paper's 512, capped to
      what the explorer's context leaves after the longest prefix of the run (a fixed value that
      leaves no room makes the sampler return nothing, and the stage fails when that hits most
      rationales; see `selfexplore.explore.stage`).
    stop: strings that end a completion (e.g. "Problem:", where a model runs on into a new
      problem whose answer would otherwise be graded); None: the sample stage's stop strings
      (`inherit_stop`, applied by the CLI and the pipeline), [] none.
    mode: "exhaustive" is the paper (k completions at every step, every rationale on its own);
      "adaptive" draws the k tries in `waves` (default 1, 1, 2), stops a step at its first
      success and shares identical prefixes of one question (same pit distribution, fewer tokens;
      see `selfexplore.explore.pit`).
    max_steps: steps explored per rationale at most; longer rationales without a pit in the
      first `max_steps` steps count as "no_pit".
    chunk_size: rationales per resumable shard (whole questions are kept in one chunk); the
      unit of work the ranks share. It does not change the draws' seeds.
    schedule: "stream" (default) sends each draw to the engine as soon as the search knows it
      (on vLLM it also overlaps chunks), so the engine never idles at the end of a wave;
      "waves" waits for every wave of draws and explores one chunk at a time (the former
      schedule, kept for measurement: bench/bench_explore_schedule.py). Both draw with the same
      seeds (every draw has its own), so it is not part of the resume fingerprint; only how
      draws share a batch can move one by float rounding (measured: identical records).
    seed: base of every draw's seed (derived per question in adaptive mode or per rationale
      in exhaustive mode, prefix and draw number); None: the pipeline's seed plus the round
      index (0 for the stand-alone `explore`).
    rejected_mode: granular rejected text, the pit step only ("pit_step", the paper) or the pit
      step to the end of the rationale ("pit_to_end").
    round: the self-improvement round written into the pairs' metadata.
    """

    k: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int | None = None
    stop: list[str] | None = None
    mode: Mode = "adaptive"
    waves: tuple[int, ...] | None = None
    max_steps: int = 20
    chunk_size: int = 256
    schedule: Schedule = "stream"
    seed: int | None = None
    rejected_mode: RejectedMode = "pit_step"
    round: int = 1

    def __post_init__(self) -> None:
        if self.waves is not None:
            self.waves = tuple(int(w) for w in self.waves)  # YAML gives a list

    def problems(self, prefix: str = "explore") -> list[str]:
        """Every invalid value, named `prefix.field` (the pipeline lists all of a config's at once;
        the explore stage raises them together)."""
        problems = knob_problems(prefix, self.draws())
        for name, value, choices in (("mode", self.mode, MODES), ("schedule", self.schedule, SCHEDULES),
                                     ("rejected_mode", self.rejected_mode, REJECTED_MODES)):
            if value not in choices:
                problems.append(f"{prefix}.{name} must be one of {choices}, got {value!r}")
        for name in ("k", "max_steps", "chunk_size"):
            if getattr(self, name) < 1:
                problems.append(f"{prefix}.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.waves is not None and (any(w < 1 for w in self.waves) or sum(self.waves) != self.k):
            problems.append(f"{prefix}.waves {list(self.waves)} must be positive and sum to k={self.k}")
        return problems

    def new_tokens(self, room: int | None = None) -> int:
        """Tokens per completion: `max_new_tokens`, else the paper's 512 capped to `room` (when known)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        return PAPER_MAX_NEW_TOKENS if room is None else min(PAPER_MAX_NEW_TOKENS, room)

    def draws(self, room: int | None = None) -> DrawParams:
        """How each completion is drawn, with `new_tokens(room)` as its budget."""
        return DrawParams(self.temperature, self.top_p, self.new_tokens(room), self.stop)

    def inherit_stop(self, stop: Sequence[str] | None) -> ExploreConfig:
        """This config with the sample stage's `stop` when it sets none of its own (`stop=None`)."""
        return self if self.stop is not None else replace(self, stop=list(stop or []))

    def wave_sizes(self) -> tuple[int, ...]:
        """Draws per wave: all k at once when exhaustive, else `waves` or the doubling default."""
        if self.mode == "exhaustive":
            return (self.k,)
        return self.waves if self.waves is not None else doubling_waves(self.k)

    def search_fingerprint(self) -> dict[str, Any]:
        """The settings that change which completions are drawn (resume must match on these)."""
        d = asdict(self)
        for key in ("rejected_mode", "round", "schedule"):
            d.pop(key)
        d["waves"] = list(self.wave_sizes())
        return d
