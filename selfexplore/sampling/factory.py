"""`get_sampler`: the configured backend for a model folder (the one module that knows them all)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from selfexplore.memory import release_accelerator_memory
from selfexplore.sampling.base import Backend, Sampler, SamplingConfig, resolve_backend
from selfexplore.validation import raise_problems


@contextmanager
def pinned_to_local_device(local_rank: int) -> Iterator[None]:
    """While an engine is created, make the rank's own GPU the only visible one (vLLM starts its
    workers from the environment; without this every rank's engine would land on GPU 0)."""
    import torch

    if local_rank == 0 and "LOCAL_RANK" not in os.environ or not torch.cuda.is_available():
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = before.split(",") if before else [str(i) for i in range(torch.cuda.device_count())]
    if local_rank >= len(visible):
        raise RuntimeError(f"local rank {local_rank} has no GPU: CUDA_VISIBLE_DEVICES lists {len(visible)}")
    os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


def get_sampler(config: SamplingConfig | Backend, model_path: str,
                adapter_path: str | None = None, *, cache_dir: str | None = None, local_rank: int = 0,
                **overrides: Any) -> Sampler:
    """Build the configured backend for a model folder (plus an optional LoRA adapter folder).

    `config` may also be a bare backend name, with SamplingConfig fields as keyword overrides.
    `cache_dir` (vLLM only) becomes VLLM_CACHE_ROOT when that is unset, to keep compile
    caches inside the run directory. `local_rank`: the rank's GPU on its node (data-parallel
    units start one engine per rank: HF on `cuda:<local_rank>`, vLLM pinned to that GPU).
    Every engine starts here, after `release_accelerator_memory`: an engine sized from the free
    memory ("auto") must not count what a dropped trainer or a closed engine still caches.
    """
    release_accelerator_memory()
    if isinstance(config, str):
        config = SamplingConfig(backend=config, **overrides)  # type: ignore[arg-type]
    elif overrides:
        config = replace(config, **overrides)
    raise_problems(config.problems(), "sampling config")
    if resolve_backend(config.backend) == "hf":
        from selfexplore.sampling.hf import HFSampler

        return HFSampler.from_pretrained(model_path, adapter_path, batch_size=config.batch_size,
                                         overlong_prompts=config.overlong_prompts,
                                         max_model_len=config.max_model_len, dtype=config.dtype,
                                         local_rank=local_rank)
    from selfexplore.sampling.vllm_backend import VLLMSampler

    with pinned_to_local_device(local_rank):
        return VLLMSampler(model_path, adapter_path, config=config, cache_dir=cache_dir)
