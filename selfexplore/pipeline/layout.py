"""Where a pipeline run keeps everything: one `RunLayout` names every path under `run_dir`.

    state.json, config.json, pipeline.log, .lock     bookkeeping (state, lock, console)
    base/                                            tiny model built from scratch (quickstart only)
    round_0/sft/{policy/, eval.jsonl}                SFT
    round_1/samples.jsonl                            samples of the SFT policy (-> RFT data)
    round_1/rft.jsonl, round_1/rft/policy/           RFT data and policy
    round_r/explorer_samples.jsonl                   samples of round r's explorer (-> outcome pairs)
    round_r/pairs.jsonl, round_r/explore/            outcome pairs; first-pit exploration
    round_r/explore/{explore,gpairs}.jsonl           exploration records, granular pairs
    round_r/prm.jsonl, round_r/prm_stats.json        process-reward rows from the exploration
    round_r/{verifier,outcome_verifier}/             step verifiers trained on them (optional)
    <stage>/selection_samples.jsonl                  answers the verifier-guided selectors choose among
    round_1/outcome_dpo/policy/                      baseline: DPO on outcome pairs
    round_r/self_explore/policy/                     step-level DPO, round r
    round_r/self_explore/adapter/                    its LoRA adapter alone (adapter reference, keep)
    <stage>/eval.jsonl, <stage>/eval_sampled.jsonl   greedy (and sampled) evaluation of a stage
    report.md, report.png                            the report
    cache/, reference_cache/, logs/                  vLLM caches, DPO reference log-probs, loggers

A stage is named by its directory relative to the run (`round_0/sft`, `round_2/self_explore`),
the name its unit has in `state.json`; paths recorded there are relative to the run directory
(`relative`), so a moved run still resolves them (`resolve`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "state.json"
CONFIG_FILE = "config.json"
# The stages (a trained policy and its evaluation), named by their directory in the run.
SFT = "round_0/sft"
RFT = "round_1/rft"
OUTCOME_DPO = "round_1/outcome_dpo"


def self_explore(round_index: int) -> str:
    """Round `round_index`'s step-level DPO stage."""
    return f"round_{round_index}/self_explore"


def eval_unit(stage_dir: str) -> str:
    """The unit that evaluates a stage's policy (its greedy and sampled answers)."""
    return f"{stage_dir}/eval"


def round_unit(round_index: int, name: str) -> str:
    """A unit of round `round_index` that is not a stage: 'samples.jsonl', 'rft_data', 'pairs', ..."""
    return f"round_{round_index}/{name}"


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory (nothing is created or read here)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str or any os.PathLike is accepted

    # ----- bookkeeping and outputs of the whole run ---------------------------------------------
    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def config(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log(self) -> Path:
        return self.root / "pipeline.log"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def report_selection_png(self) -> Path:
        """Accuracy vs N of the verifier-guided selectors (runs with a verifier)."""
        return self.root / "report_selection.png"

    @property
    def base(self) -> Path:
        """The from-scratch model's folder (quickstart)."""
        return self.root / "base"

    @property
    def cache(self) -> Path:
        """Sampler caches (vLLM compile caches)."""
        return self.root / "cache"

    @property
    def reference_cache(self) -> Path:
        """DPO reference log-probs, keyed by reference and data."""
        return self.root / "reference_cache"

    @property
    def logs(self) -> Path:
        """Where loggers that write files (CSV, TensorBoard) save."""
        return self.root / "logs"

    # ----- rounds -----------------------------------------------------------------------------
    def round_dir(self, round_index: int) -> Path:
        return self.root / round_unit(round_index, "").rstrip("/")

    def samples(self, round_index: int = 1) -> Path:
        """Samples of the SFT policy, from which RFT data is made (round 1)."""
        return self.round_dir(round_index) / "samples.jsonl"

    def explorer_samples(self, round_index: int) -> Path:
        """Samples of round `round_index`'s explorer, from which its outcome pairs are made."""
        return self.round_dir(round_index) / "explorer_samples.jsonl"

    def rft(self, round_index: int = 1) -> Path:
        """The RFT training set."""
        return self.round_dir(round_index) / "rft.jsonl"

    def pairs(self, round_index: int) -> Path:
        """Outcome pairs (chosen: a correct sample, rejected: a wrong one)."""
        return self.round_dir(round_index) / "pairs.jsonl"

    def explore_dir(self, round_index: int) -> Path:
        return self.round_dir(round_index) / "explore"

    def prm(self, round_index: int) -> Path:
        """The process-reward rows of round `round_index`'s exploration (TRL stepwise supervision)."""
        return self.round_dir(round_index) / "prm.jsonl"

    def gpairs(self, round_index: int) -> Path:
        """Granular (step-level) pairs of the first-pit exploration."""
        return self.explore_dir(round_index) / "gpairs.jsonl"

    # ----- stages (a trained policy and its evaluation) -----------------------------------------
    def stage(self, stage_dir: str) -> Path:
        """A stage's directory, e.g. `stage("round_0/sft")`."""
        return self.root / stage_dir

    def policy(self, stage_dir: str) -> Path:
        """The exported policy of a stage."""
        return self.stage(stage_dir) / "policy"

    def adapter(self, stage_dir: str) -> Path:
        """A LoRA stage's adapter alone (beside the merged policy): what the next round continues
        when its reference is the adapter-free base (`dpo.reference: adapter`, `reference_update: keep`)."""
        return self.stage(stage_dir) / "adapter"

    def selection_samples(self, stage_dir: str) -> Path:
        """The answers per test question that the verifier-guided selectors choose among."""
        return self.stage(stage_dir) / "selection_samples.jsonl"

    def greedy_eval(self, stage_dir: str) -> Path:
        """The greedy evaluation samples of a stage's policy."""
        return self.stage(stage_dir) / "eval.jsonl"

    def eval_sampled(self, stage_dir: str) -> Path:
        """The sampled evaluation (`eval_samples` answers per question) of a stage's policy."""
        return self.stage(stage_dir) / "eval_sampled.jsonl"

    # ----- recorded paths ---------------------------------------------------------------------
    def relative(self, path: str | os.PathLike) -> str:
        """A path as recorded: inside the run directory relative to it (a moved run still resolves it),
        any other absolute (so `resolve` never joins it onto the run directory)."""
        p = Path(path)
        if p == self.root or self.root in p.parents:
            return p.relative_to(self.root).as_posix()
        return os.fspath(p.absolute())

    def resolve(self, recorded: str | os.PathLike) -> Path:
        """A recorded path made usable again: a relative one is under the run directory."""
        p = Path(recorded)
        return p if p.is_absolute() else self.root / p
