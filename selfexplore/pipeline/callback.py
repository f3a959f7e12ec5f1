"""SelfExploreCallback: the round transition between Self-Explore DPO rounds.

At the end of round r's training it exports the policy, evaluates it, has the pipeline sample
from it, pair, explore (the new policy is the explorer) and build the granular pairs of round
r+1, then points the preference datamodule at them and sets the reference for the next round
('keep' the RFT reference, as the paper, or 'update' it to this policy). The next `fit` then
reads the new pairs. Sampling runs once the round's training steps are done, and each
sampler is closed before the next fit starts (`selfexplore.sampling.vllm_backend` says how a
vLLM engine's memory is freed). Before any of it the fit's optimizer states go to the CPU and its
gradients are dropped (`offload_training_state`); the policy's weights stay on the device (the
export and the next round need them), and every engine is sized from the memory then free
(`gpu_memory_utilization: auto`, after `release_accelerator_memory`; docs/gpu.md has the sums).

Under DDP / FSDP the hook runs on every rank: the export is collective, rank 0 alone evaluates,
samples and explores while the other ranks wait for its results (see `Pipeline.unit`). Only
then does any rank move on, to the same next-round pairs file and reference (paths fixed by the
run directory and the round), so every rank trains round r+1 on the same data.
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
