"""SelfExploreCallback: the round transition between Self-Explore DPO rounds.

At the end of round r's training it exports and evaluates the policy, has the pipeline sample,
pair and explore with it, then points the preference datamodule at round r+1's granular pairs
and sets the next reference ('keep' or 'update'). Training state is offloaded and every
sampler closed first, so sampling and the next fit never hold the device memory at once.

Design notes: docs/design.md#round-callback
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from lightning.pytorch import Callback, LightningModule, Trainer

from selfexplore.memory import offload_training_state

if TYPE_CHECKING:
    from selfexplore.training.dpo import StepDPOModule


class RoundRunner(Protocol):
    """What the callback needs of the pipeline (`selfexplore.pipeline.run.Pipeline`)."""

    def finish_self_explore_round(self, round_index: int, module: StepDPOModule | None,
                                  seconds: float = 0.0) -> tuple[str, dict[str, float]]: ...

    def prepare_round(self, round_index: int, explorer: str) -> Path: ...


class SelfExploreCallback(Callback):
    def __init__(self, pipeline: RoundRunner, round_index: int, rounds: int,
                 reference_update: Literal["keep", "update"] = "keep") -> None:
        self.pipeline = pipeline
        self.round_index = round_index
        self.rounds = rounds
        self.reference_update = reference_update
        self._started = time.perf_counter()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        module: StepDPOModule = pl_module  # type: ignore[assignment]
        seconds = time.perf_counter() - self._started
        offload_training_state(trainer.optimizers, [module])  # engines start below, beside this trainer
        policy, metrics = self.pipeline.finish_self_explore_round(self.round_index, module, seconds)
        if trainer.logger is not None:
            trainer.logger.log_metrics({f"round/{k}": v for k, v in metrics.items()}, step=self.round_index)
            trainer.logger.save()
        if self.round_index >= self.rounds:
            return
        self.round_index += 1
        gpairs = self.pipeline.prepare_round(self.round_index, explorer=policy)
        trainer.datamodule.set_train_path(str(gpairs))
        module.reset_reference(str(policy) if self.reference_update == "update" else None)
