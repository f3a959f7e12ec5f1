"""Optimizer and learning-rate schedule, shared by SFT and step-DPO (one place, YAML-friendly).

The dataclasses are what LightningCLI configs set (`optimizer: {name: rmsprop, lr: 1e-6}`);
`configure_optimizers` turns them into the dict Lightning expects, stepping the schedule
every optimizer step. The schedule itself is the pure function `lr_lambda`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, get_args

import torch
from torch.optim.lr_scheduler import LambdaLR

OptimizerName = Literal["adamw", "rmsprop", "adamw8bit", "sgd"]
ScheduleName = Literal["linear", "cosine", "constant"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULES: tuple[str, ...] = get_args(ScheduleName)


@dataclass
class OptimizerConfig:
    """Which optimizer and its hyperparameters (paper: AdamW for SFT, RMSprop for DPO).

    `betas`/`eps` apply to the Adam family (and `eps` to RMSprop), `momentum` to SGD and
    RMSprop; `adamw8bit` needs bitsandbytes (8-bit optimizer states, for large models).
    """

    name: OptimizerName = "adamw"
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # YAML gives a list

    def problems(self, prefix: str = "optimizer") -> list[str]:
        """Every invalid value, named `prefix.field`: the pipeline lists all of a config's at once."""
        problems = []
        if self.name not in OPTIMIZERS:
            problems.append(f"{prefix}.name {self.name!r} is not one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            problems.append(f"{prefix}.lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            problems.append(f"{prefix}.weight_decay must be >= 0, got {self.weight_decay!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            problems.append(f"{prefix}.betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            problems.append(f"{prefix}.eps must be > 0, got {self.eps!r}")
        if self.momentum < 0:
            problems.append(f"{prefix}.momentum must be >= 0, got {self.momentum!r}")
        if self.momentum and self.name not in ("sgd", "rmsprop"):
            problems.append(f"{prefix}.momentum applies to sgd and rmsprop only, not {self.name!r}")
        return problems


@dataclass
class SchedulerConfig:
    """Warmup then decay of the learning rate (paper: linear, warmup_ratio 0.1 for DPO).

    `warmup_steps`, when set, overrides `warmup_ratio` (fraction of the total optimizer steps).
    `min_lr_ratio` is the floor the decay ends at, as a fraction of the peak lr.
    """

    name: ScheduleName = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.0

    def problems(self, prefix: str = "scheduler") -> list[str]:
        """Every invalid value, named `prefix.field`: the pipeline lists all of a config's at once."""
        problems = []
        if self.name not in SCHEDULES:
            problems.append(f"{prefix}.name {self.name!r} is not one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"{prefix}.warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            problems.append(f"{prefix}.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            problems.append(f"{prefix}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        return problems

    def num_warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps (ratio rounded up, as HF Trainer does)."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * total_steps)


def lr_lambda(step: int, total: int, warmup: int, name: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based).

    Warmup rises linearly 1/warmup, 2/warmup, ..., 1 over the first `warmup` steps (so the
    first step already learns, unlike HF's schedule which starts at 0). Then `linear` and
    `cosine` decay from 1 at step `warmup` to `min_ratio` at step `total`; `constant` stays 1.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 1.0 - progress if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(params: Iterable[Any], opt: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer over `params` (tensors or param-group dicts); frozen tensors are left out."""
    params = [p for p in params if isinstance(p, dict) or p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters to optimize")
    if opt.name == "adamw":
        return torch.optim.AdamW(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=opt.lr, eps=opt.eps, weight_decay=opt.weight_decay,
                                   momentum=opt.momentum)
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    try:
        from bitsandbytes.optim import AdamW8bit
    except ImportError as e:
        raise ImportError("optimizer 'adamw8bit' needs bitsandbytes (pip install bitsandbytes)") from e
    return AdamW8bit(params, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)


def configure_optimizers(params: Iterable[Any], opt: OptimizerConfig, sched: SchedulerConfig,
                         total_steps: int) -> dict[str, Any]:
    """Lightning's `configure_optimizers` return value: optimizer + per-step LambdaLR."""
    if total_steps < 1 or total_steps == math.inf:
        raise ValueError(f"total_steps must be a finite number >= 1, got {total_steps} "
                         "(set max_epochs or max_steps on the Trainer)")
    total_steps = int(total_steps)
    warmup = sched.num_warmup_steps(total_steps)
    if warmup > total_steps:
        raise ValueError(f"warmup ({warmup} steps) is longer than training ({total_steps} steps)")
    optimizer = build_optimizer(params, opt)
    schedule = partial(lr_lambda, total=total_steps, warmup=warmup, name=sched.name, min_ratio=sched.min_lr_ratio)
    scheduler = LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
