"""What SFT and step-DPO share: the policy model, its optimizer, throughput, export.

`PolicyModule` is a thin LightningModule base. It builds the model in `configure_model` (so
FSDP2 can shard it as it is created: `selfexplore.training.sharding`), optionally trains a tiny
model from scratch first (the CPU quickstart), logs tokens/s, and exports the trained policy as
an HF folder that the samplers (HF generate, vLLM) load in the next stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info

from selfexplore.models import (
    ModelSpec,
    TinyLlamaConfig,
    build_tiny_llama,
    export_policy,
    load_model,
    load_tokenizer,
)
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig, configure_optimizers
from selfexplore.training.sharding import gather_full_state, load_sharded, mixed_precision_policy
from selfexplore.validation import raise_problems


class PolicyModule(LightningModule):
    """Base for SFTModule and StepDPOModule; subclasses implement the steps.

    Args:
        model: the policy (HF id or local folder, LoRA / QLoRA options).
        from_scratch: when set and `model.path` does not exist yet, a tiny Llama with a
            tokenizer trained on the datamodule's text is built there first (quickstart).
        optimizer, scheduler: see `selfexplore.training.optim`.
        export_dir: where the trained policy is saved as an HF folder at the end of `fit`.
        export_merged: merge LoRA weights into the export (else base + adapter).
    """

    def __init__(
        self,
        model: ModelSpec,
        from_scratch: TinyLlamaConfig | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        export_dir: str | None = None,
        export_merged: bool = True,
    ) -> None:
        super().__init__()
        self.model_spec = model
        self.from_scratch = from_scratch
        self.optimizer_config = optimizer or OptimizerConfig()
        self.scheduler_config = scheduler or SchedulerConfig()
        raise_problems(self.optimizer_config.problems() + self.scheduler_config.problems(), type(self).__name__)
        self.export_dir = export_dir
        self.export_merged = export_merged
        self.policy: torch.nn.Module | None = None
        self._tokenizer = None
        self._batch_started: float | None = None
        self._batch_tokens = 0

    # ----- model lifecycle -------------------------------------------------------------
    def prepare_data(self) -> None:
        """Build the from-scratch base model once (local rank 0) before anything loads it."""
        if self.from_scratch is None or Path(self.model_spec.path).exists():
            return
        datamodule = self.trainer.datamodule
        corpus = getattr(datamodule, "corpus_texts", None)
        if corpus is None:
            raise ValueError("from_scratch needs a datamodule with corpus_texts() to train a tokenizer")
        rank_zero_info(f"Building a tiny Llama from scratch at {self.model_spec.path}")
        build_tiny_llama(corpus(), self.model_spec.path, self.from_scratch)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.model_spec.path)
        return self._tokenizer

    def configure_model(self) -> None:
        if self.policy is None:
            self.policy = self.build_model(self.model_spec, for_training=True)

    def build_model(self, spec: ModelSpec, for_training: bool) -> torch.nn.Module:
        """`spec`'s model as this fit runs it: sharded (rank 0 reads the weights) under FSDP2, else whole."""
        if self.device_mesh is None:
            return load_model(spec, for_training=for_training)
        precision = self.trainer.precision if self._trainer is not None else None
        return load_sharded(spec, self.device_mesh["data_parallel"], for_training, mixed_precision_policy(precision))

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        return configure_optimizers(params, self.optimizer_config, self.scheduler_config,
                                    int(self.trainer.estimated_stepping_batches))

    # ----- throughput ----------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_started = time.perf_counter()

    def log_throughput(self, tokens: int) -> None:
        """Count the real (non-padding) tokens of this step; logged per second once the step ends."""
        self._batch_tokens = tokens

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """tokens/s over the whole step: forward, backward and optimizer update."""
        if self._batch_started is None or not self._batch_tokens:
            return
        elapsed = time.perf_counter() - self._batch_started
        if elapsed > 0:
            self.log("train/tokens_per_sec", self._batch_tokens / elapsed, on_step=True, prog_bar=True)

    # ----- export --------------------------------------------------------------------------
    def on_train_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, out_dir: str, merge: bool | None = None) -> Path | None:
        """Save the policy as an HF folder from rank 0; returns None on the other ranks.

        `merge` (default `export_merged`): fold a LoRA adapter into the weights, or save it alone.

        Sharded weights (FSDP2 via ModelParallelStrategy, FSDP1 via FSDPStrategy) are first
        gathered to full tensors on rank 0's CPU and saved as they are (no second model is
        built to hold them); the gather is collective, so under FSDP every rank must call this.
        """
        state = self._gather_sharded_policy()
        if self.global_rank != 0:
            return None
        merge = self.export_merged if merge is None else merge
        path = export_policy(self.policy, self.tokenizer, out_dir, merge=merge, state_dict=state)
        rank_zero_info(f"Exported policy to {path}")
        return path

    def _gather_sharded_policy(self) -> dict[str, torch.Tensor] | None:
        """The policy's full state dict (on rank 0; empty elsewhere) when FSDP shards it, else None."""
        if self.device_mesh is not None:  # FSDP2: the policy's parameters are DTensors
            return gather_full_state(self.policy)
        if self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP1 wraps this whole module: gather it (Lightning's 'full' state dict) and keep the policy
            state = self.trainer.strategy.lightning_module_state_dict()
            return {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
        return None
