"""Sampling: the Sampler protocol, HF `generate` and vLLM backends, and the resumable sample stage."""

from selfexplore.completion import Completion, is_finished
from selfexplore.sampling.base import (
    DrawParams,
    Sampler,
    SamplerBase,
    SamplingConfig,
    derive_seed,
    resolve_backend,
    truncate_at_stop,
)
from selfexplore.sampling.factory import get_sampler
from selfexplore.sampling.hf import HFSampler
from selfexplore.sampling.stage import SampleStats, run_sample_stage

__all__ = [
    "Completion",
    "DrawParams",
    "HFSampler",
    "SampleStats",
    "Sampler",
    "SamplerBase",
    "SamplingConfig",
    "derive_seed",
    "get_sampler",
    "is_finished",
    "resolve_backend",
    "run_sample_stage",
    "truncate_at_stop",
]
