"""The one-command pipeline: SFT -> sample -> RFT -> explore -> step-DPO, then more rounds.

`Pipeline.run` is the method, round by round, as a plain loop. Every unit of work writes plain
files under `run_dir` (`selfexplore.pipeline.layout`) and is then marked complete in
`state.json`, so rerunning the same command continues where it stopped (`Pipeline.unit`).
Under DDP / FSDP every rank walks the same units: training units are collective, sampling,
exploration and evaluation are data-parallel (each rank its shards, rank 0 merges), and the
small rest runs on rank 0 while the others wait for it in `state.json`.

Design notes: docs/design.md#pipeline
"""

from __future__ import annotations

import errno
import logging
import math
import shutil
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy

from selfexplore.data.preference import PreferenceDataModule
from selfexplore.data.sft import SFTDataModule
from selfexplore.explore.builders import build_outcome_pairs, build_rft_set, read_samples, sample_stats
from selfexplore.explore.stage import run_explore_stage
from selfexplore.io import read_jsonl, remove_stale_temporaries, write_jsonl
from selfexplore.models import ModelSpec, build_tiny_llama, load_tokenizer
from selfexplore.pipeline.compare import correct_by_question
from selfexplore.pipeline.config import DPOStageConfig, PipelineConfig, SFTStageConfig
from selfexplore.pipeline.console import Console, TrainingBar, console_session
from selfexplore.pipeline.layout import OUTCOME_DPO, RFT, SFT, RunLayout, eval_unit, round_unit, self_explore
from selfexplore.pipeline.lock import RunLock, RunLocked
from selfexplore.pipeline.loggers import build_logger, log_round_metrics
from selfexplore.pipeline.plan import BASE, RFT_DATA, SFT_SAMPLES, selection_unit, verifier_unit, verifiers_of
from selfexplore.pipeline.report import write_report
from selfexplore.pipeline.state import PipelineError, RunState
from selfexplore.prm.data import write_prm_data
from selfexplore.prm.guided import guided_answers
from selfexplore.prm.implicit import ImplicitRewardScorer
from selfexplore.prm.metrics import evaluate_scores
from selfexplore.prm.unit import run_verifier_unit
from selfexplore.prm.verifier import load_verifier
from selfexplore.ranks import Workers, is_rank_zero, poll
from selfexplore.sampling.base import Sampler, resolve_seed
from selfexplore.sampling.factory import get_sampler
from selfexplore.sampling.stage import run_sample_stage
from selfexplore.shards import StageContext
from selfexplore.tasks import Problem, get_task
from selfexplore.training.dpo import StepDPOModule
from selfexplore.training.reference import checkpoint_fingerprint
from selfexplore.training.sft import SFTModule

log = logging.getLogger(__name__)

# How long a rank other than 0 waits to see rank 0's state.json before it calls the run
# directory unshared (torchrun and srun start every rank at once; rank 0 may still be loading).
SHARED_RUN_DIR_SECONDS = 120.0
# Result fields that hold a path written by the unit (recorded relative to the run directory).
PATH_KEYS = ("policy", "path")


def collapsed(policy: float, reference: float, uniform: float, kept: float = 0.1, informed: float = 0.5) -> bool:
    """Whether a policy kept less than `kept` of its reference's advantage over uniform guessing
    (per-token log-probs of the chosen responses), when the reference had a real one
    (`informed` nats); NaN counts as collapsed. DPO may lower the chosen log-probs somewhat;
    losing nearly everything the reference knew is a destroyed model."""
    if math.isnan(policy):
        return True
    return reference - uniform > informed and policy - uniform < kept * (reference - uniform)


class Pipeline:
    """Runs (or resumes) one configured run: construct, `setup`, `run`, `close`.

    Each public step is an idempotent unit (`unit`): done units return what they recorded, so
    `run` states the method once and a resumed run walks the same lines.
    """

    def __init__(self, config: PipelineConfig, force: bool = False) -> None:
        self.cfg = config
        self.force = force
        self.layout = RunLayout(config.run_dir)
        self.root = self.layout.root
        self.rank_zero = is_rank_zero()
        self._prompt: Callable[[Problem], str] | None = None
        self._engine: tuple[str, Sampler] | None = None  # (policy, its open sampler)
        self._weights: dict[str, str] = {}  # policy path -> content fingerprint (recorded by its unit)
        self.lock: RunLock | None = None

    def setup(self) -> Pipeline:
        """Load the task's data, join the run directory (wait for rank 0's, or lock it) and read its state.

        Task, data and splits are checked before anything is written, so a mistake in them never
        leaves a run directory that the corrected command is refused.
        """
        config = self.cfg
        self.task = get_task(config.task, **config.task_options)
        train = self.task.load("train", path=self._data("train"))
        self.gold_problems = train[: config.sft_questions]
        # The paper samples the questions SFT trained on; 'held_out' those after them.
        pool = self.gold_problems if config.sample_questions == "sft" else train[config.sft_questions:]
        if not pool and config.sample_questions == "held_out":
            raise ValueError(f"sample_questions='held_out': the train split has {len(train)} questions, all used "
                             f"by SFT (sft_questions={config.sft_questions}); none are left to sample")
        self.train_problems = sorted(pool, key=lambda p: p.id)[: config.train_questions]
        self.eval_problems = self.task.load(config.eval_split, path=self._data(config.eval_split))[: config.eval_limit]
        if not self.eval_problems:
            raise ValueError(f"eval_split {config.eval_split!r} has no questions to evaluate")
        self.problems_by_id = {p.id: p for p in self.train_problems}
        if not self.rank_zero:
            self._check_run_dir_is_shared()
        self.lock = RunLock(self.root).acquire() if self.rank_zero else None
        self.state = RunState(self.root, config.fingerprint_dict(), force=self.force, writer=self.rank_zero)
        self.console = Console(config, self.state, {"gold": len(self.gold_problems), "train": len(self.train_problems),
                                                    "eval": len(self.eval_problems)}, enabled=self.rank_zero)
        if self.state.redone:
            log.warning("--force: the changed settings invalidate %d completed units, which are redone: %s",
                        len(self.state.redone), ", ".join(self.state.redone))
        return self

    def _check_run_dir_is_shared(self) -> None:
        """A rank other than 0 must see the state.json rank 0 writes at its start and at every
        unit's: without it the rank would wait for units forever on a directory only it sees."""
        path, deadline = self.layout.state, time.time() + SHARED_RUN_DIR_SECONDS

        def fresh() -> bool:
            if path.is_file() and path.stat().st_mtime >= time.time() - SHARED_RUN_DIR_SECONDS:
                return True
            if time.time() > deadline:
                raise PipelineError(
                    f"{self.root}: this rank ({socket.gethostname()}) sees no recent state.json from rank 0 after "
                    f"{SHARED_RUN_DIR_SECONDS:.0f} s; the run directory must be on a file system every rank of "
                    "every node shares (e.g. a network file system), and every rank must be started with the same "
                    "run_dir")
            return False
        poll(fresh)

    # ----- the method ------------------------------------------------------------------------
    def run(self) -> Path | None:
        """The whole method; returns `report.md` (rank 0; other ranks write nothing and return None)."""
        cfg = self.cfg
        self._warn_if_ranks_start_late()
        base = self.build_base()
        sft = self.train_sft(SFT, base, cfg.sft)
        self.evaluate(SFT, sft)
        samples = self.sample(SFT_SAMPLES, sft, self.train_problems)
        rft = self.train_sft(RFT, base if cfg.rft_init == "base" else sft, cfg.rft, self.build_rft_data(samples))
        self.evaluate(RFT, rft)
        gpairs = self.explore(1, explorer=rft)
        verifiers = self.train_verifiers(1, explorer=rft)
        self.select(RFT, rft, verifiers)
        if "outcome_dpo" in cfg.baselines:
            outcome = self.train_dpo(OUTCOME_DPO, init=rft, reference=rft, pairs=self.layout.pairs(1))
            self.evaluate(OUTCOME_DPO, outcome)
            self.select(OUTCOME_DPO, outcome, verifiers, reference=rft)
        if "self_explore" in cfg.baselines:
            policy = rft
            for r in range(1, cfg.rounds + 1):
                if r > 1:  # round r: the last round's policy explores, then trains on its own pits
                    gpairs = self.explore(r, explorer=policy)
                    verifiers = self.train_verifiers(r, explorer=policy)
                reference = rft if cfg.reference_update == "keep" else policy
                policy = self.train_dpo(self_explore(r), init=policy, reference=reference, pairs=gpairs)
                self.evaluate(self_explore(r), policy)
                self.select(self_explore(r), policy, verifiers, reference=reference)
        if not self.rank_zero:
            return None
        log_round_metrics(cfg.trainer.logger, self.root, self.state.units, cfg.rounds)
        return write_report(self.root, self.state.units, cfg)

    def close(self) -> None:
        """Close the engine and release the run directory (released anyway when this process ends)."""
        self.close_engine()
        if self.lock is not None:
            self.lock.release()

    # ----- bookkeeping -----------------------------------------------------------------------
    def unit(self, name: str, work: Callable[[], dict[str, Any]], collective: bool = False) -> dict[str, Any]:
        """Run `work` unless `name` is already complete; record its result and wall time.

        A `collective` unit (training, export, and the data-parallel sampling, exploration and
        evaluation, whose stages split the work over `Workers`) runs on every rank, any other on
        rank 0 alone. Rank 0 records the result (or, if `work` raises, the failure); the other
        ranks wait for that record and return it, so all ranks continue from the same result.
        A result with a `policy` also records `weights`, the content fingerprint of that folder:
        what samples and explorations of the policy are keyed by, so a retrained policy at the
        same path never resumes its predecessor's shards.
        """
        if self.state.done(name):
            missing = self._missing_outputs(self.state.result(name)) if self.rank_zero else []
            if not missing:
                return self._resolved(self.state.result(name))
            if not self.force:
                raise PipelineError(f"{missing[0]}: file missing, but state.json records unit {name!r} that wrote "
                                    "it as complete; restore it, or rerun with --force true to redo that unit")
            log.warning("--force: %s is missing; redoing unit %s", missing[0], name)
            self.state.forget(name)
        if not (collective or self.rank_zero):
            return self._resolved(self.state.wait_for(name))
        self.console.start(name)
        if self.rank_zero:
            self.state.start(name)
        start = time.perf_counter()
        try:
            try:
                result = work()
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                free = shutil.disk_usage(self.root).free / 2**30
                raise PipelineError(
                    f"unit {name}: no space left on the device writing {error.filename or self.root} "
                    f"({free:.1f} GiB free there now); free some space and rerun: completed units are kept, "
                    "and this one resumes from its finished shards") from error
        except BaseException as error:
            if self.rank_zero:
                self.state.fail(name, error)
            self.console.failed(name, error)
            raise
        if not self.rank_zero:
            return self._resolved(self.state.wait_for(name))
        if "policy" in result:
            result["weights"] = checkpoint_fingerprint(result["policy"])
        result["seconds"] = round(time.perf_counter() - start, 2)
        stored = self.state.complete(name, {k: self._relative(v) if k in PATH_KEYS else v for k, v in result.items()})
        remove_stale_temporaries(self.root / name)
        self.console.finish(name, stored)
        return self._resolved(stored)

    def _relative(self, path: str) -> str:
        """A path inside the run directory as recorded: relative to it, so a moved run still works."""
        return self.layout.relative(path)

    def _resolved(self, result: dict[str, Any]) -> dict[str, Any]:
        """A recorded result with its paths usable again (relative ones are under the run directory)."""
        resolved = {k: str(self.layout.resolve(v)) if k in PATH_KEYS else v for k, v in result.items()}
        if "policy" in resolved and "weights" in resolved:
            self._weights[resolved["policy"]] = resolved["weights"]
        return resolved

    def policy_id(self, policy: str) -> str:
        """What a policy's samples and explorations are keyed by: the content fingerprint its unit
        recorded (a run directory from before fingerprints were recorded: hashed now)."""
        if policy not in self._weights:
            self._weights[policy] = checkpoint_fingerprint(policy)
        return self._weights[policy]

    def _missing_outputs(self, result: dict[str, Any]) -> list[str]:
        return [path for k, path in self._resolved(result).items() if k in PATH_KEYS and not Path(path).exists()]

    def _trainer_args(self, out_dir: Path) -> dict[str, Any]:
        """The Trainer arguments every training unit shares (its budget comes from its own stage)."""
        s = self.cfg.trainer
        return dict(
            accelerator=s.accelerator, devices=s.devices, num_nodes=s.num_nodes, strategy=self._strategy(),
            precision=s.precision, gradient_clip_val=s.gradient_clip_val, log_every_n_steps=s.log_every_n_steps,
            logger=build_logger(s.logger, self.root, self._relative(str(out_dir))), default_root_dir=out_dir,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=s.enable_progress_bar,
            callbacks=[TrainingBar()] if s.enable_progress_bar else [])

    def _trainer(self, out_dir: Path, stage: SFTStageConfig | DPOStageConfig) -> Trainer:
        return Trainer(**self._trainer_args(out_dir), max_epochs=stage.epochs,
                       accumulate_grad_batches=stage.accumulate_grad_batches, limit_val_batches=0,
                       num_sanity_val_steps=0)

    def _strategy(self) -> str | Strategy:
        """`trainer.strategy`; 'fsdp2' (FSDP2 sharding over every device, a strategy Lightning has
        no name for) becomes a new ModelParallelStrategy for each Trainer."""
        s = self.cfg.trainer
        if s.strategy != "fsdp2":
            return s.strategy
        return ModelParallelStrategy(data_parallel_size=int(s.devices) * s.num_nodes, tensor_parallel_size=1)

    def _fit(self, module: LightningModule, data: LightningDataModule, out_dir: Path,
             stage: SFTStageConfig | DPOStageConfig) -> None:
        """Train `module` (Lightning's teardown moves it and its optimizer states off the accelerator,
        so the engines that sample next find the memory free once the module is dropped)."""
        self.close_engine()  # an engine never holds the accelerator while a fit trains
        seed_everything(self.cfg.seed, workers=True)
        self._trainer(out_dir, stage).fit(module, datamodule=data)

    def prompt(self, problem: Problem) -> str:
        """Model input for a problem under the configured prompt format (one place for every stage)."""
        if self._prompt is None:
            fmt = self.cfg.prompt_format
            tokenizer = load_tokenizer(self.cfg.model.path) if fmt.chat_template else None
            self._prompt = fmt.prompter(self.task, tokenizer)
        return self._prompt(problem)

    # ----- stages ----------------------------------------------------------------------------
    def build_base(self) -> str:
        """The base model as configured: a hub id or folder (recorded as `model`: not the run's output,
        never resolved against the run directory), or the tiny one built here first (`policy`: an
        output, checked on resume like any other)."""
        path = self.cfg.model.path

        def work() -> dict[str, Any]:
            if self.cfg.from_scratch is None:
                return {"model": path}
            if not Path(path).exists():
                corpus = [self.task.prompt(p) + p.solution for p in self.task.load("train", path=self._data("train"))]
                build_tiny_llama(corpus, Path(path), self.cfg.from_scratch, seed=self.cfg.seed)
            return {"policy": path}
        self.unit(BASE, work)
        return path

    def _data(self, split: str) -> Path | None:
        return Path(self.cfg.data_dir) / f"{split}.jsonl" if self.cfg.data_dir else None

    def train_sft(self, stage_dir: str, init: str, stage: SFTStageConfig, train_path: Path | None = None) -> str:
        out = self.layout.stage(stage_dir)

        def work() -> dict[str, Any]:
            module = SFTModule(replace(self.cfg.model, path=init), optimizer=stage.optimizer, scheduler=stage.scheduler)
            data = SFTDataModule(task=self.cfg.task, task_options=self.cfg.task_options, data_dir=self.cfg.data_dir,
                                 train_path=str(train_path) if train_path else None, max_length=stage.max_length,
                                 include_prompt_in_loss=stage.include_prompt_in_loss,
                                 batch_size=stage.batch_size, train_limit=self.cfg.sft_questions, val_limit=0,
                                 seed=self.cfg.seed, prompt_format=self.cfg.prompt_format)
            self._fit(module, data, out, stage)
            module.export(str(self.layout.policy(stage_dir)))
            return {"policy": str(self.layout.policy(stage_dir)), "data": data.stats}
        return self.unit(stage_dir, work, collective=True)["policy"]

    def train_dpo(self, stage_dir: str, init: str, reference: str, pairs: Path) -> str:
        """DPO from `init` against `reference` on `pairs` (outcome pairs, or a round's granular ones)."""
        stage = self.cfg.dpo
        self._require_pairs(pairs, "granular pairs" if stage_dir != OUTCOME_DPO else "outcome pairs")

        def work() -> dict[str, Any]:
            module = self._dpo_module(init, reference, stage)
            self._fit(module, self._preference_data(pairs, stage), self.layout.stage(stage_dir), stage)
            self._check_not_collapsed(stage_dir, module)
            result = {"policy": str(self.layout.policy(stage_dir))}
            module.export(result["policy"])
            if stage.reference == "adapter":  # what a next round continues under 'keep' (see _dpo_module)
                module.export(str(self.layout.adapter(stage_dir)), merge=False)
                result["adapter"] = str(self.layout.adapter(stage_dir))
            return result
        return self.unit(stage_dir, work, collective=True)["policy"]

    def _dpo_module(self, init: str, reference: str, stage: DPOStageConfig) -> StepDPOModule:
        """The DPO module whose policy starts as `init` and whose reference is `reference`.

        With `reference: adapter` the reference is the policy's base with its adapter disabled, so
        a policy that does not start from its reference (a later round under 'keep') is that
        reference plus the adapter the previous round trained, continued.
        """
        spec = replace(self.cfg.model, path=init)
        if stage.reference == "adapter" and init != reference:
            spec = replace(self.cfg.model, path=reference, lora=None, adapter_path=self._adapter_of(init))
        return StepDPOModule(
            spec, loss=stage.loss, reference=stage.reference,
            reference_path=None if stage.reference == "adapter" else reference,
            reference_cache_dir=str(self.layout.reference_cache), optimizer=stage.optimizer, scheduler=stage.scheduler)

    def _inference_spec(self, path: str) -> ModelSpec:
        """An exported policy loaded to score with: whole weights in the run's dtype (no adapter, no
        4-bit base: exports are merged)."""
        m = self.cfg.model
        return ModelSpec(path=path, dtype=m.dtype, trust_remote_code=m.trust_remote_code,
                         attn_implementation=m.attn_implementation)

    def _adapter_of(self, policy: str) -> str:
        """The saved adapter of a recorded DPO policy (`train_dpo` writes it beside the merged one)."""
        for result in self.state.units.values():
            resolved = self._resolved(result)
            if resolved.get("policy") == policy and "adapter" in resolved:
                return resolved["adapter"]
        raise PipelineError(f"{policy}: no saved adapter recorded for it, which dpo.reference 'adapter' with "
                            "reference_update 'keep' continues in the next round; rerun with --force true")

    def _preference_data(self, pairs: Path, stage: DPOStageConfig) -> PreferenceDataModule:
        return PreferenceDataModule(train_path=str(pairs), max_length=stage.max_length,
                                    max_prompt_length=stage.max_prompt_length, batch_size=stage.batch_size,
                                    seed=self.cfg.seed)

    def sample(self, name: str, policy: str, problems: list, greedy: bool = False,
               n: int | None = None, max_new_tokens: int | None = None) -> dict[str, Any]:
        """Graded samples of `policy` (`n`, default sampling.n, per question; one greedy answer when `greedy`)
        in unit `name` (the samples file, relative to the run directory).

        Data-parallel: every rank samples its shards with its own engine, rank 0 merges.
        """
        def work() -> dict[str, Any]:
            s = self.cfg.sampling
            count, temperature = (1, 0.0) if greedy else (n or s.n, s.temperature)
            max_new = max_new_tokens or (self.cfg.eval_max_new_tokens if greedy else s.max_new_tokens)
            config = replace(s, n=count, temperature=temperature, max_new_tokens=max_new,
                             seed=resolve_seed(s.seed, self.cfg.seed))
            context = StageContext(model=self.policy_id(policy), force=self.force, prompt=self.prompt,
                                   workers=self._workers(), abort=self._abort(name))
            stats = run_sample_stage(self._sampler(policy, context.workers), self.task, problems, self.root / name,
                                     config, context, settings={"batch_size": s.batch_size},
                                     progress=self.cfg.trainer.enable_progress_bar)
            return {} if stats is None else {"path": str(self.root / name), **stats.to_dict()}
        return self.unit(name, work, collective=True)

    def _sampler(self, policy: str, workers: Workers) -> Sampler:
        """The engine for `policy`, kept open across consecutive units of that policy (its
        evaluation, samples and exploration: one engine start instead of three); any other
        policy, and every fit, closes it first (`close_engine`)."""
        if self._engine is not None and self._engine[0] == policy:
            return self._engine[1]
        self.close_engine()
        sampler = get_sampler(self.cfg.sampling, policy, cache_dir=str(self.layout.cache),
                              local_rank=workers.local_rank)
        self._engine = (policy, sampler)
        return sampler

    def close_engine(self) -> None:
        """Close the open engine (before a fit: training and vLLM never hold the GPU together)."""
        if self._engine is not None:
            engine, self._engine = self._engine[1], None
            engine.close()

    def _warn_if_ranks_start_late(self) -> None:
        """Lightning's own launcher starts the other ranks at the first fit: say what that costs."""
        s = self.cfg.trainer
        planned = (int(s.devices) if str(s.devices).isdigit() else 1) * s.num_nodes
        if self.rank_zero and planned > 1 and self._workers().world_size == 1:
            log.warning("%d ranks are configured but this process was not started by torchrun or srun: "
                        "Lightning starts the other ranks at the first fit, so the units before it (on a "
                        "resumed run, possibly all sampling of a round) run on this rank alone. Start every "
                        "rank with torchrun or srun to share them (README, multi-GPU and multi-node).", planned)

    def _workers(self) -> Workers:
        """The ranks that share a data-parallel unit now (Lightning's launcher starts its extra
        ranks only at the first fit: units before it run on rank 0 alone)."""
        s = self.cfg.trainer
        return Workers.from_environment(int(s.devices) if str(s.devices).isdigit() else None, s.num_nodes)

    def _abort(self, name: str) -> Callable[[], None] | None:
        """What a rank other than 0 checks while it waits inside a data-parallel unit."""
        return None if self.rank_zero else (lambda: self.state.check_rank_zero(name))

    def evaluate(self, stage_dir: str, policy: str) -> dict[str, Any]:
        """Greedy (and, with `eval_samples`, sampled) accuracy of a stage's policy on the eval split."""
        def work() -> dict[str, Any]:
            result = self.sample(self._relative(str(self.layout.greedy_eval(stage_dir))), policy, self.eval_problems,
                                 greedy=True)
            metrics = {"accuracy": result.get("pass_rate_mean"), "num_eval": result.get("questions")}
            if self.cfg.eval_samples:
                sampled = self.sample(self._relative(str(self.layout.eval_sampled(stage_dir))), policy,
                                      self.eval_problems, n=self.cfg.eval_samples,
                                      max_new_tokens=self.cfg.eval_max_new_tokens)
                metrics["sampled_accuracy"] = sampled.get("pass_rate_mean")
            return metrics
        return self.unit(eval_unit(stage_dir), work, collective=True)

    def build_rft_data(self, samples: dict[str, Any]) -> Path:
        out = self.layout.rft()

        def work() -> dict[str, Any]:
            records = build_rft_set(read_samples(samples["path"]), max_per_question=self.cfg.rft_max_per_question)
            if self.cfg.rft_include_gold:
                records += [{"prompt": self.prompt(p), "response": p.solution,
                             "meta": {"question_id": p.id, "sample_id": "gold"}}
                            for p in self.gold_problems]
            return {"path": str(out), "records": write_jsonl(out, records)}
        self.unit(RFT_DATA, work)
        return out

    def _gold_sample(self, problem: Problem) -> dict[str, Any]:
        """A problem's gold rationale as a correct sample (after the policy's own, so they are chosen first)."""
        return {"id": f"{problem.id}:gold", "question_id": problem.id, "prompt": self.prompt(problem),
                "completion": problem.solution, "correct": True}

    def explore(self, round_index: int, explorer: str) -> Path:
        """Samples of `explorer` -> outcome pairs -> first-pit exploration -> granular pairs (their path)."""
        layout = self.layout
        samples = self.sample(self._relative(str(layout.explorer_samples(round_index))), explorer,
                              self.train_problems)

        def pairs_work() -> dict[str, Any]:
            records = read_samples(samples["path"])
            candidates = records + [self._gold_sample(p) for p in self.train_problems] \
                if self.cfg.pairs_include_gold else records
            pairs = build_outcome_pairs(candidates, round_index=round_index,
                                        max_per_question=self.cfg.rft_max_per_question)
            return {"path": str(layout.pairs(round_index)), "pairs": write_jsonl(layout.pairs(round_index), pairs),
                    **sample_stats(records)}
        pairs = self.unit(round_unit(round_index, "pairs"), pairs_work)
        self._require_pairs(Path(pairs["path"]), "outcome pairs")  # nothing to explore without them

        def explore_work() -> dict[str, Any]:
            e = self.cfg.explore
            config = replace(e, round=round_index, seed=resolve_seed(e.seed, self.cfg.seed) + round_index)
            context = StageContext(model=self.policy_id(explorer), force=self.force, prompt=self.prompt,
                                   workers=self._workers(), abort=self._abort(round_unit(round_index, "explore")))
            stats = run_explore_stage(self._sampler(explorer, context.workers), self.task, pairs["path"],
                                      self.problems_by_id, layout.explore_dir(round_index),
                                      config.inherit_stop(self.cfg.sampling.stop), context)
            return {} if stats is None else {"path": str(layout.gpairs(round_index)), **stats}
        gpairs = Path(self.unit(round_unit(round_index, "explore"), explore_work, collective=True)["path"])
        self.unit(round_unit(round_index, "prm"), lambda: self._prm_rows(round_index, explorer))
        return gpairs

    def _prm_rows(self, round_index: int, explorer: str) -> dict[str, Any]:
        """Round `round_index`'s exploration labels as process-reward rows (`round_r/prm.jsonl`), each pit
        re-explored by the explorer first with `consensus` (rank 0's engine: the pits are few)."""
        layout, consensus = self.layout, self.cfg.consensus
        sampler = self._sampler(explorer, self._workers()) if consensus is not None else None
        stats = write_prm_data(layout.explore_dir(round_index) / "explore.jsonl", layout.explorer_samples(round_index),
                               layout.prm(round_index), self.task, self.problems_by_id, k=self.cfg.explore.k,
                               round_index=round_index, config=self.cfg.prm, sampler=sampler, consensus=consensus)
        return {"path": str(layout.prm(round_index)),
                **{k: v for k, v in stats.items() if k not in ("explore", "samples")}}  # paths: in the unit

    def train_verifiers(self, round_index: int, explorer: str) -> dict[str, str]:
        """Round `round_index`'s verifiers (labels -> folder), trained from its explorer on its prm rows;
        {} when the run trains none."""
        v = self.cfg.verifier
        if v is None:
            return {}
        found = {}
        for labels in verifiers_of(asdict(v)):
            name = verifier_unit(round_index, labels)

            def work(labels: str = labels, out: Path = self.layout.stage(name)) -> dict[str, Any]:
                self.close_engine()  # training and an engine never hold the accelerator together
                seed_everything(self.cfg.seed, workers=True)
                config = replace(v.train, labels=labels, seed=self.cfg.seed)
                result = run_verifier_unit(explorer, self.layout.prm(round_index), out, config,
                                           trainer=self._trainer_args(out), model=self.cfg.model)
                return {"path": str(out / "verifier"), **result}
            found[labels] = self.unit(name, work, collective=True)["path"]
        return found

    def select(self, stage_dir: str, policy: str, verifiers: dict[str, str], reference: str | None = None) -> None:
        """Verifier-guided answers of a stage's policy: its sampled test answers chosen among by every
        selector, under each verifier and (a DPO policy, with `verifier.implicit`) its implicit reward."""
        v = self.cfg.verifier
        if v is None:
            return

        def work() -> dict[str, Any]:
            samples = self.sample(self._relative(str(self.layout.selection_samples(stage_dir))), policy,
                                  self.eval_problems, n=v.samples, max_new_tokens=self.cfg.eval_max_new_tokens)
            if not self.rank_zero:
                return {}  # rank 0 scores and chooses
            self.close_engine()  # the verifiers load next
            scorers = {labels: load_verifier(path).score for labels, path in verifiers.items()}
            held_out: dict[str, Any] = {}
            if v.implicit and reference is not None:
                scorers["implicit"] = ImplicitRewardScorer(
                    self._inference_spec(policy), self._inference_spec(reference), beta=self.cfg.dpo.loss.beta).score
                # the free verifier on the rows the trained ones were measured on: a step is flagged
                # when the policy likes it less than its reference does (reward < 0)
                rows = read_jsonl(Path(verifiers["process"]).parent / "val.jsonl")
                scores = scorers["implicit"]([r["prompt"] for r in rows], [r["completions"] for r in rows])
                held_out = {"implicit_held_out": evaluate_scores(scores, [r["labels"] for r in rows], 0.0)}
            greedy = correct_by_question(self.layout.greedy_eval(stage_dir))
            return {**guided_answers(read_jsonl(samples["path"]), greedy, scorers, self.task, v.selection),
                    **held_out}
        self.unit(selection_unit(stage_dir), work, collective=True)

    def _check_not_collapsed(self, name: str, module: StepDPOModule) -> None:
        """Stop at a DPO policy that training destroyed, before it is exported and evaluated
        (otherwise it scores 0, and the next round dies for want of pairs, far from the cause)."""
        policy, reference = module.chosen_logprob_per_token()
        uniform = -math.log(module.policy.config.vocab_size)
        if not collapsed(policy, reference, uniform):
            return
        raise PipelineError(
            f"{name}: the trained policy collapsed: it gives the chosen responses {policy:.3g} log-prob per token "
            f"(uniform guessing: {uniform:.2f}, the reference: {reference:.3g}). The step size is too large for "
            f"this model (dpo.optimizer.lr={self.cfg.dpo.optimizer.lr}, "
            f"dpo.optimizer.name={self.cfg.dpo.optimizer.name!r}): lower dpo.optimizer.lr and rerun with "
            "--force true (it redoes only the DPO units and what follows them; the rest is kept)")

    def _require_pairs(self, path: Path, what: str) -> None:
        if not path.is_file():
            raise PipelineError(f"{path}: file missing (the unit that writes it is complete); restore it, or "
                                "rerun with --force true to redo that unit")
        if not path.stat().st_size:
            raise PipelineError(
                f"{path}: no {what}. The policy needs questions it answers right in some samples and wrong in "
                "others; train SFT longer, sample more (sampling.n), or make the task easier (task_options).")


def run_pipeline(config: PipelineConfig, force: bool = False, verbose: bool = False) -> Path | None:
    """Run or resume the configured pipeline; returns the path of `report.md` (None off rank 0).

    The console shows the plan unit by unit; library output only with `verbose` (see
    `pipeline.console`); rank 0 logs everything to `run_dir/pipeline.log`.
    """
    log_path = RunLayout(config.run_dir).log if is_rank_zero() else None
    with console_session(log_path, verbose):
        pipeline = Pipeline(config, force=force)
        try:
            return pipeline.setup().run()
        except RunLocked:
            raise  # the log belongs to the run that holds the lock
        except BaseException:
            if log_path is not None:  # the whole traceback, for a console that shows one line (cli)
                with log_path.open("a", encoding="utf-8") as f:
                    traceback.print_exc(file=f)
            raise
        finally:
            pipeline.close()
