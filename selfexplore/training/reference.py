"""DPO reference log-probs computed once per data set: cache keys, the on-disk cache, the split pass.

The table ([N, 2]: chosen, rejected per pair) is what `StepDPOModule(reference="precomputed")`
trains against. The pass is split across data-parallel ranks (each forwards its share of the
length-sorted batches, then an all-gather assembles the table) instead of every rank running
the whole data set; under FSDP2 every rank still makes the same number of forwards (they are
collective), a rank short of work repeating a batch whose rows it drops.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from selfexplore.hashing import update_with_file
from selfexplore.io import atomic_open
from selfexplore.models.files import local_model_path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")
LogpsFn = Callable[[dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def checkpoint_fingerprint(*paths: str | None) -> str:
    """Content hash of model/adapter folders (weights, configs, tokenizer); ids hash by name.

    A `gguf:` spec hashes as its converted folder, whose name holds the file's content hash.
    """
    h = hashlib.sha256()
    for path in paths:
        if not path:
            continue
        folder = Path(local_model_path(path))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) \
            if folder.is_dir() else []
        if not files:
            h.update(f"id:{path}".encode())
        for file in files:
            h.update(str(file.relative_to(folder)).encode())
            update_with_file(h, file)
    return h.hexdigest()


def cache_key(reference_sources: Sequence[str | None], data_fingerprint: str, **settings: Any) -> str:
    """Key of a reference table: the reference weights' content, the tokenized data, and every
    setting that changes the numbers (log-prob averaging, dtype, quantization)."""
    payload = {"reference": checkpoint_fingerprint(*reference_sources), "data": data_fingerprint, **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def read_table(path: Path, rows: int) -> torch.Tensor | None:
    """A cached table of `rows` pairs, or None when there is none (or it has another shape)."""
    if not path.is_file():
        return None
    table = torch.load(path, map_location="cpu")
    return table if table.shape == (rows, 2) else None


def write_table(path: Path, table: torch.Tensor) -> None:
    """Write atomically: a reader never sees half a table."""
    with atomic_open(path, "wb") as f:
        torch.save(table, f)


def rank_batches(lengths: Sequence[int], batch_size: int, rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's precompute batches as (dataset indices, keep): longest pairs first (least padding),
    batch b to rank b % world, padded with dropped repeats of the shortest batch so that every
    rank makes the same number of forwards."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    per_rank = -(-len(batches) // world)
    mine = batches[rank::world]
    return [(b, True) for b in mine] + [(batches[-1], False)] * (per_rank - len(mine))


def precompute_table(logps: LogpsFn, dataset: Any, collate: Callable, batch_size: int, device: torch.device,
                     rank: int = 0, world: int = 1,
                     all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The [N, 2] table of `logps(batch)` (chosen, rejected) over `dataset`, this rank's share
    computed here and the rest all-gathered (`all_gather`: [R, 3] -> [world, R, 3]; needed when
    world > 1). Runs under the caller's grad mode and autocast."""
    plan = rank_batches(dataset.lengths, batch_size, rank, world)
    local = torch.full((len(plan) * batch_size, 3), -1.0, dtype=torch.float64)  # index -1: no pair
    filled = 0
    for indices, keep in plan:
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in indices]).items()}
        chosen, rejected = logps(batch)
        if keep:
            rows = torch.stack([batch["index"].double(), chosen.double(), rejected.double()], dim=1).cpu()
            local[filled:filled + len(rows)] = rows
            filled += len(rows)
    gathered = local[None] if world == 1 else all_gather(local.to(device)).cpu().reshape(world, -1, 3)
    rows = gathered.reshape(-1, 3)
    rows = rows[rows[:, 0] >= 0]
    table = torch.full((len(dataset), 2), float("nan"))
    table[rows[:, 0].long()] = rows[:, 1:].float()
    if rows.shape[0] != len(dataset):
        raise RuntimeError(f"reference precompute covered {rows.shape[0]} of {len(dataset)} pairs")
    return table
