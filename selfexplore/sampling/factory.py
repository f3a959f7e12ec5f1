"""`get_sampler`: the configured backend for a model folder (the one module that knows them all)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from selfexplore.memory import release_accelerator_memory
from selfexplore.sampling.base import Backend, Sampler, SamplingConfig, resolve_backend


def get_sampler(config: SamplingConfig | Backend, model_path: str,
                adapter_path: str | None = None, *, cache_dir: str | None = None,
                **overrides: Any) -> Sampler:
    """Build the configured backend for a model folder (plus an optional LoRA adapter folder).

    `config` may also be a bare backend name, with SamplingConfig fields as keyword overrides.
    `cache_dir` (vLLM only) becomes VLLM_CACHE_ROOT when that is unset, to keep compile
    caches inside the run directory.
    Every engine starts here, after `release_accelerator_memory`: an engine sized from the free
    memory ("auto") must not count what a dropped trainer or a closed engine still caches.
    """
    release_accelerator_memory()
    if isinstance(config, str):
        config = SamplingConfig(backend=config, **overrides)  # type: ignore[arg-type]
    elif overrides:
        config = replace(config, **overrides)
    if resolve_backend(config.backend) == "hf":
        from selfexplore.sampling.hf import HFSampler

        return HFSampler.from_pretrained(model_path, adapter_path, batch_size=config.batch_size,
                                         overlong_prompts=config.overlong_prompts,
                                         max_model_len=config.max_model_len, dtype=config.dtype)
    from selfexplore.sampling.vllm_backend import VLLMSampler

    return VLLMSampler(model_path, adapter_path, config=config, cache_dir=cache_dir)
