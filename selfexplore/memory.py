"""Accelerator memory handed from training to a sampling engine, and sized from what is free.

A pipeline unit builds its module, fits it, exports the policy and drops the module and its
trainer (Lightning's teardown has already moved the module and its optimizer states off the
accelerator). Before each engine start, dead objects are collected and the CUDA cache emptied
(`release_accelerator_memory`, called by `get_sampler`), and vLLM's share of the GPU is set
from the memory then free (`gpu_memory_utilization: auto`, `auto_memory_utilization`).
Torch-only, so importing it costs nothing a sampler does not already pay."""

from __future__ import annotations

import gc
import sys

GIB = 1 << 30
# Left free beside an "auto"-sized engine: the trainer's allocator, the CUDA context of a process
# that starts later, and vLLM's own non-torch allocations, which its profiler estimates only.
AUTO_HEADROOM = 0.05
# Below this share vLLM has almost no KV cache left after its weights: refuse instead of crawling.
MIN_AUTO_UTILIZATION = 0.1


def release_accelerator_memory() -> None:
    """Collect unreachable objects (a closed engine, a dropped model), then return the CUDA
    allocator's cached blocks to the device, so the next engine's measurement sees them free."""
    gc.collect()
    torch = sys.modules.get("torch")  # a process that never imported torch holds no accelerator memory
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def accelerator_memory() -> tuple[int, int] | None:
    """(free, total) bytes of the current CUDA device, as the driver sees them (every process), or None."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)


def auto_memory_utilization(free: int, total: int, headroom: float = AUTO_HEADROOM) -> float:
    """vLLM's `gpu_memory_utilization` for an engine that may take what is free now, less `headroom`.

    vLLM reads the value as this engine's share of the device's TOTAL memory and refuses to start
    when less than that is free, so it must not exceed free / total.
    """
    if total <= 0 or not 0 <= free <= total:
        raise ValueError(f"free ({free}) and total ({total}) bytes must satisfy 0 <= free <= total, total > 0")
    share = round(free / total - headroom, 3)
    if share < MIN_AUTO_UTILIZATION:
        raise RuntimeError(
            f"only {free / GIB:.1f} of {total / GIB:.1f} GiB are free on the GPU: too little for a vLLM engine "
            f"(gpu_memory_utilization 'auto' would be {share:.3f}). Something still holds the memory: a "
            "training module still referenced, another process, or an engine not closed.")
    return share

