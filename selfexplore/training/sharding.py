"""FSDP2 for 7B fits: shard units, bf16 mixed precision, weights read once (rank 0), full-state gather.

Without this every rank read the full fp32 checkpoint into host RAM before sharding (8 ranks x
28 GB for a 7B model: 232 GB per fit). Now rank 0 reads it, the other ranks build the same
model on the meta device, everyone shards, and rank 0's weights are broadcast shard by shard
(`torch.distributed.checkpoint.state_dict.set_model_state_dict(broadcast_from_rank0=True)`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from selfexplore.models import ModelSpec, load_model
from selfexplore.models.load import build_model_skeleton


def mixed_precision_policy(precision: str | None) -> Any:
    """FSDP2's `MixedPrecisionPolicy` for a Lightning precision flag, or None (keep fp32).

    bf16 ("bf16-mixed", "bf16-true"): parameters are all-gathered and computed in bf16 (half
    the all-gather traffic and unsharded memory) while the sharded master weights, the
    optimizer and the gradient reduction stay in fp32 (a ~1e-6 step on a bf16 weight rounds away).
    """
    if precision is None or not str(precision).startswith("bf16"):
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def shard_with_fsdp2(model: torch.nn.Module, mesh: Any, mp_policy: Any = None) -> None:
    """FSDP2: shard every transformer block, then the root (embeddings, head) over `mesh`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    block_names = set(getattr(base_model(model), "_no_split_modules", None) or [])
    if not block_names:
        raise ValueError(f"{type(model).__name__} does not declare its transformer blocks "
                         "(_no_split_modules); cannot pick FSDP2 shard units")
    options = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, **options)
    fully_shard(model, **options)
    for managed in (model, base_model(model)):  # HF generate then keeps ranks in step (synced_gpus)
        managed._is_fsdp_managed_module = True


def load_sharded(spec: ModelSpec, mesh: Any, for_training: bool, mp_policy: Any = None) -> torch.nn.Module:
    """`load_model(spec)` sharded over `mesh`, with the checkpoint read by rank 0 alone.

    Rank 0 loads the model (host RAM: the full weights, once); the others build it on the meta
    device. All shard it; then rank 0's full state is broadcast and each rank keeps its shard.
    Buffers (rotary tables, not in the state dict when non-persistent) are broadcast as well.
    Collective: every rank must call it, and `mesh` must span them all (data-parallel only, as
    the recipes run): `broadcast_from_rank0` sends from global rank 0.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    reader = dist.get_rank() == 0
    model = load_model(spec, for_training) if reader else build_model_skeleton(spec, for_training)
    full = model.state_dict() if reader else {}  # holds the unsharded tensors until they are sent
    shard_with_fsdp2(model, mesh, mp_policy)
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" \
        else torch.device(mesh.device_type)
    if not reader:
        model.to_empty(device=device)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def gather_full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of an FSDP2 model on rank 0's CPU; empty on the other ranks.
    Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
