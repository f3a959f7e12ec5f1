"""SFTModule: causal-LM fine-tuning on rationales, evaluated by greedy-decoding accuracy."""

from __future__ import annotations

from typing import Any

import torch

from selfexplore.grading import AnswerAccuracy
from selfexplore.models import ModelSpec, TinyLlamaConfig
from selfexplore.tasks import get_task
from selfexplore.training.evaluation import greedy_complete
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.training.policy import PolicyModule


class SFTModule(PolicyModule):
    """Stage 1 (SFT) and RFT: next-token loss on the response tokens the datamodule labels.

    Validation and test decode greedily (the paper's evaluation) and log answer accuracy,
    graded by the task's `is_correct`, through a torchmetrics metric that syncs across ranks.

    Args (beyond `PolicyModule`'s):
        task, task_options: the task whose grader scores generated answers; by default the
            datamodule's task.
        eval_max_new_tokens: generation budget per evaluated problem.
        eval_stop: strings that end a generated rationale early.
    """

    def __init__(
        self,
        model: ModelSpec,
        task: str | None = None,
        task_options: dict[str, Any] | None = None,
        from_scratch: TinyLlamaConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        eval_max_new_tokens: int = 256,
        eval_stop: list[str] | None = None,
        export_dir: str | None = None,
        export_merged: bool = True,
    ) -> None:
        super().__init__(model, from_scratch, optimizer, scheduler, export_dir, export_merged)
        self.save_hyperparameters()
        self.task = get_task(task, **(task_options or {})) if task else None
        self.eval_max_new_tokens = eval_max_new_tokens
        self.eval_stop = eval_stop
        self.val_accuracy = AnswerAccuracy()
        self.test_accuracy = AnswerAccuracy()

    def setup(self, stage: str) -> None:
        if self.task is None:
            self.task = getattr(self.trainer.datamodule, "task", None)
            if self.task is None:
                raise ValueError("SFTModule needs `task` when the datamodule has none")

    def _lm_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        out = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])
        return out.loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._lm_loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite SFT loss at step {self.global_step}, batch {batch_idx}")
        self.log("train/loss", loss, prog_bar=True)
        self.log_throughput(int(batch["attention_mask"].sum()))
        return loss

    def _evaluate(self, batch: dict[str, Any], stage: str, metric: AnswerAccuracy) -> None:
        if "input_ids" in batch:
            self.log(f"{stage}/loss", self._lm_loss(batch), sync_dist=True,
                     batch_size=len(batch["prompts"]))
        completions = greedy_complete(self.policy, self.tokenizer, batch["prompts"], self.eval_max_new_tokens,
                                      self.eval_stop)
        metric.update([self.task.is_correct(c, gold) for c, gold in zip(completions, batch["golds"])])
        self.log(f"{stage}/accuracy", metric, prog_bar=True, batch_size=len(batch["prompts"]))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)
