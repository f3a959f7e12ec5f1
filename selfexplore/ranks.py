"""Which rank this process is, how a rank waits for another's files, and what a failed rank records.

All three go through the launcher's environment and the run directory, never a process group:
no group exists before the first fit, and a wait as long as a sampling unit would outlast a
collective's timeout.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Launchers name a process's rank in these (torchrun: RANK/WORLD_SIZE; srun: SLURM_*;
# Lightning's launcher: NODE_RANK/LOCAL_RANK/WORLD_SIZE, set only once its first fit started).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")
# Poll fast at first (most waits are short), then at most once a second to spare a shared file system.
POLL_SECONDS = (0.02, 1.0)


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or the only process).

    Read from the launcher's environment variables rather than a process group, so every
    rank knows its role from the start, before the first `fit` creates the group: the main
    process of Lightning's launcher has none of them set until then and is rank 0.
    """
    return all(int(os.environ.get(name, "0")) == 0 for name in RANK_VARIABLES)


@dataclass(frozen=True)
class Workers:
    """This process's place among the processes that share a data-parallel unit.

    Shards are the unit of work, never ranks: rank r takes shards r, r + W, ... (`owns`), so any
    world size writes the same shard files and a resume may use another one. `since` is when
    this session started: failure records written before it belong to an earlier attempt.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    since: float = field(default_factory=time.time)

    @classmethod
    def from_environment(cls, devices_per_node: int | None = None, num_nodes: int = 1) -> Workers:
        """This process's rank from its launcher's variables. Under Lightning's own launcher
        (LOCAL_RANK / NODE_RANK, set from its first fit on; it removes WORLD_SIZE after every
        fit) the world is `devices_per_node` x `num_nodes`."""
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
            rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun
            rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        elif "LOCAL_RANK" in env and (devices_per_node or "WORLD_SIZE" in env):  # Lightning's launcher
            per_node = devices_per_node or int(env["WORLD_SIZE"]) // num_nodes
            world = per_node * num_nodes
            rank = int(env.get("NODE_RANK", "0")) * per_node + int(env["LOCAL_RANK"])
        else:
            rank, world = 0, 1
        local = int(env.get("LOCAL_RANK", env.get("SLURM_LOCALID", "0")))
        if not 0 <= rank < world:
            raise RuntimeError(f"rank {rank} is outside world size {world} (launcher environment)")
        return cls(rank=rank, world_size=world, local_rank=local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank


def poll(ready: Callable[[], bool]) -> None:
    """Return once `ready()` is true, checking with backoff (`POLL_SECONDS`).

    `ready` raises to stop waiting (another rank failed, a deadline passed), so every wait of
    every rank has the one loop and pace.
    """
    delay, max_delay = POLL_SECONDS
    while not ready():
        time.sleep(delay)
        delay = min(2 * delay, max_delay)


@dataclass(frozen=True)
class Failure:
    """What a rank records when its part of `unit` raised, so the ranks waiting for it raise too.

    `at` is when it failed, `since` when the failed work started (the run's status shows the
    time between), `attempt` the pipeline attempt it belongs to (None outside the pipeline).
    """

    unit: str
    rank: int
    host: str
    error: str
    at: float
    since: float | None = None
    attempt: str | None = None

    @classmethod
    def of(cls, unit: str, error: BaseException, rank: int, since: float | None = None,
           attempt: str | None = None) -> Failure:
        return cls(unit, rank, socket.gethostname(), f"{type(error).__name__}: {error}", time.time(), since, attempt)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Failure:
        """A stored record; one written before these fields existed reads as failed at time 0 (stale)."""
        return cls(str(record.get("unit", "?")), int(record.get("rank", 0)), str(record.get("host", "?")),
                   str(record.get("error", "?")), float(record.get("at", 0.0)), record.get("since"),
                   record.get("attempt"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def message(self, waiting_for: str) -> str:
        return (f"rank {self.rank} ({self.host}) failed in {self.unit} while this rank waited for {waiting_for}: "
                f"{self.error}")
