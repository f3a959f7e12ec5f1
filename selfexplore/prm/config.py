"""Settings of the process-reward components, one dataclass each (plain typed fields for the CLI).

Each has `problems()` listing every invalid value by name: the pipeline collects all of a run's
at once, and the functions that take one raise its list (`raise_problems`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from selfexplore.sampling.base import DrawParams, knob_problems

Disagreeing = Literal["drop", "keep"]
ConsensusKeep = Literal["all", "confirmed"]


@dataclass
class PRMDataConfig:
    """How explore records and graded samples become `prm.jsonl` rows (`selfexplore.prm.rows`).

    disagreeing: what to do with a row whose labels contradict its rationale's own final answer
      (a wrong rationale where every explored step recovered, i.e. no pit): "drop" (default:
      all-true labels on a wrong answer would teach the verifier that the error is fine) or
      "keep". Either way they are counted in the stats.
    correct_per_question: correct rationales per question labelled by their final answer
      (source "outcome"), picked by the RFT rules (distinct, finished); 0 writes none.
    """

    disagreeing: Disagreeing = "drop"
    correct_per_question: int = 8

    def problems(self, prefix: str = "prm_data") -> list[str]:
        """Every invalid value, named `prefix.field`."""
        problems = []
        if self.disagreeing not in ("drop", "keep"):
            problems.append(f"{prefix}.disagreeing must be 'drop' or 'keep', got {self.disagreeing!r}")
        if self.correct_per_question < 0:
            problems.append(f"{prefix}.correct_per_question must be >= 0, got {self.correct_per_question!r}")
        return problems


@dataclass
class ConsensusConfig:
    """The consensus check of pits (`selfexplore.prm.consensus`): fresh draws from each pit prefix.

    k: fresh completions per pit (the exploration's own k draws found none reaching gold; a
      success among these marks a false pit: the completer was unlucky, the step is fine).
    temperature, top_p, max_new_tokens, stop: how they are drawn (the exploration's defaults).
    seed: base of the draws' seeds; keep it different from the exploration's so the draws are
      fresh (each draw's seed is derived from it, the row and the draw number).
    keep: "all" rows (each with its agreement recorded) or only "confirmed" pits (rows whose
      fresh draws all failed too; outcome rows are always kept).
    """

    k: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: list[str] = field(default_factory=list)
    seed: int = 1
    keep: ConsensusKeep = "all"

    def problems(self, prefix: str = "consensus") -> list[str]:
        """Every invalid value, named `prefix.field`."""
        problems = knob_problems(prefix, self.draws())
        if self.k < 1:
            problems.append(f"{prefix}.k must be >= 1, got {self.k!r}")
        if self.keep not in ("all", "confirmed"):
            problems.append(f"{prefix}.keep must be 'all' or 'confirmed', got {self.keep!r}")
        return problems

    def draws(self) -> DrawParams:
        """How each fresh completion is drawn."""
        return DrawParams(self.temperature, self.top_p, self.max_new_tokens, self.stop)
