"""StepDPOModule: DPO on (step-level) preference pairs, with three ways to hold the reference.

- `copy`: a frozen second model (simple; twice the weights in memory).
- `adapter`: the policy with its LoRA adapter disabled (no second copy; LoRA/QLoRA only).
- `precomputed` (default): reference log-probs computed once before training, cached on disk
  under a key of the reference weights' content hash and the tokenized data's fingerprint, so
  a stale cache can never be reused silently; training then runs one model only. When the
  reference is the policy's start (no `reference_path`, or the policy's own path) the policy
  itself computes them before its first step, so no second model is ever built; otherwise the
  reference is loaded (sharded like the policy under FSDP2) for that pass only
  (`selfexplore.training.reference`).

Chosen and rejected go through one concatenated forward ([2B, L]).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from selfexplore.models import ModelSpec
from selfexplore.models.files import local_model_path
from selfexplore.training.losses import DPOLossConfig, ReferenceMode, dpo_loss, nll_loss, sequence_logps
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.training.policy import PolicyModule
from selfexplore.training.reference import cache_key, precompute_table, read_table, write_table
from selfexplore.validation import raise_problems


class StepDPOModule(PolicyModule):
    """Step-level DPO (Self-Explore) or outcome DPO, depending only on the pairs it is fed.

    Args (beyond `PolicyModule`'s):
        loss: the objective (beta, loss_type, label_smoothing, nll_alpha, average_logps; see
            `selfexplore.training.losses.DPOLossConfig`), the same object `pipeline`'s dpo stage holds.
        reference: 'precomputed' | 'copy' | 'adapter' (see module docstring).
        reference_path: the reference checkpoint; by default the one the policy starts from
            (the paper: policy and reference both start from the RFT model).
        reference_cache_dir: where precomputed reference log-probs are cached
            (default: `<trainer.default_root_dir>/reference_cache`).
    """

    def __init__(
        self,
        model: ModelSpec,
        loss: DPOLossConfig | None = None,
        reference: ReferenceMode = "precomputed",
        reference_path: str | None = None,
        reference_cache_dir: str | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        export_dir: str | None = None,
        export_merged: bool = True,
    ) -> None:
        super().__init__(model, None, optimizer, scheduler, export_dir, export_merged)
        self.save_hyperparameters()
        if reference == "adapter" and model.lora is None and model.adapter_path is None:
            raise ValueError("reference='adapter' needs a LoRA policy (model.lora or model.adapter_path)")
        if reference == "adapter" and reference_path is not None:
            raise ValueError("reference='adapter' uses the policy's own base weights; drop reference_path")
        self.loss = loss or DPOLossConfig()
        raise_problems(self.loss.problems(), "StepDPOModule")
        self.reference_mode = reference
        self.reference_path = reference_path
        self.reference_cache_dir = reference_cache_dir
        self.reference_model: torch.nn.Module | None = None
        # split -> (data fingerprint, [N, 2] table of chosen / rejected reference log-probs)
        self.reference_tables: dict[str, tuple[str, torch.Tensor]] = {}
        # Once an optimizer stepped, the policy no longer holds its start weights, so it can no
        # longer stand in for a reference that is its start (kept across fits, unlike global_step).
        self.policy_trained = False

    # ----- reference -----------------------------------------------------------------------
    def reference_is_start(self) -> bool:
        """Whether the reference is the policy's starting weights (the paper's first round and the
        outcome-DPO baseline), which the policy itself then provides before its first step."""
        if self.reference_path is None:
            return True
        return self.model_spec.adapter_path is None and \
            local_model_path(self.reference_path) == local_model_path(self.model_spec.path)

    def _load_reference(self) -> torch.nn.Module:
        """The reference as a second model (frozen, eval mode; sharded like the policy under FSDP2)."""
        spec = ModelSpec(path=self.reference_path or self.model_spec.path, dtype=self.model_spec.dtype,
                         trust_remote_code=self.model_spec.trust_remote_code,
                         adapter_path=None if self.reference_path else self.model_spec.adapter_path)
        return self.build_model(spec, for_training=False).to(self.device)

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference_mode == "copy" and self.reference_model is None:
            self.reference_model = self._load_reference()

    def _batch_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        # use_cache=False: an eval-mode forward would otherwise build a KV cache nobody reads.
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=self.loss.average_logps)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    @torch.no_grad()
    def _live_reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_mode == "adapter":
            with self.policy.disable_adapter():
                return self._batch_logps(self.policy, batch)
        return self._batch_logps(self.reference_model, batch)

    def reference_logps(self, batch: dict[str, torch.Tensor], split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_mode == "precomputed":
            rows = self.reference_tables[split][1][batch["index"].cpu()].to(self.device)
            return rows[:, 0], rows[:, 1]
        return self._live_reference_logps(batch)

    def _ensure_reference_tables(self) -> None:
        if self.reference_mode != "precomputed":
            return
        datamodule = self.trainer.datamodule
        for split, dataset in (("train", getattr(datamodule, "train_dataset", None)),
                               ("val", getattr(datamodule, "val_dataset", None))):
            if dataset is None:
                continue
            fingerprint = dataset.fingerprint()
            if self.reference_tables.get(split, ("",))[0] != fingerprint:
                self.reference_tables[split] = (fingerprint, self.precompute_reference(dataset, datamodule))

    def on_fit_start(self) -> None:
        """Precompute before the first step, while the policy still equals the reference."""
        self._ensure_reference_tables()

    def on_validation_start(self) -> None:
        self._ensure_reference_tables()

    def reference_cache_key(self, data_fingerprint: str) -> str:
        source = ([self.reference_path] if self.reference_path
                  else [self.model_spec.path, self.model_spec.adapter_path])
        return cache_key(source, data_fingerprint, average_logps=self.loss.average_logps,
                         dtype=self.model_spec.dtype, quantization=self.model_spec.quantization)

    def precompute_reference(self, dataset: Any, datamodule: Any) -> torch.Tensor:
        """Reference log-probs of every pair of `dataset`, from the cache when its key matches.

        The pass runs under the trainer's precision (the training steps' autocast, so a policy
        equal to its reference scores a zero margin at step 0), split across ranks and gathered
        (collective: every rank calls it); rank 0 reads and writes the cache. When the reference
        is the policy's start this must run before the first optimizer step (`on_fit_start`).
        """
        cache_dir = Path(self.reference_cache_dir or Path(self.trainer.default_root_dir) / "reference_cache")
        cache = cache_dir / f"{self.reference_cache_key(dataset.fingerprint())}.pt"  # fingerprint: tokenized data
        # rank 0 decides for all: ranks that disagreed would run different numbers of collective forwards
        table = self.trainer.strategy.broadcast(read_table(cache, len(dataset)) if self.global_rank == 0 else None)
        if table is not None:
            rank_zero_info(f"Reference log-probs: reusing {cache}")
            return table
        use_policy = self.reference_is_start()
        if use_policy and self.policy_trained:
            raise RuntimeError("reference log-probs are needed after this policy was trained, when it no longer "
                               "equals its start weights, the reference: build a new module (or set reference_path)")
        model = self.policy if use_policy else self._load_reference()
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.trainer.precision_plugin.forward_context():
                table = precompute_table(lambda batch: self._batch_logps(model, batch), dataset, datamodule.collate,
                                         datamodule.batch_size, self.device, rank=self.global_rank,
                                         world=self.trainer.world_size, all_gather=self.trainer.strategy.all_gather)
        finally:
            model.train(was_training)
        if self.global_rank == 0:
            write_table(cache, table)
        rank_zero_info(f"Reference log-probs: computed {len(dataset)} pairs, cached at {cache}")
        return table

    # ----- steps ---------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.policy_trained = True

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        chosen, rejected = self._batch_logps(self.policy, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, "train" if stage == "train" else "val")
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.loss.beta, self.loss.loss_type, self.loss.label_smoothing)
        loss = losses.mean()
        if self.loss.nll_alpha:
            half = batch["loss_mask"].shape[0] // 2
            loss = loss + self.loss.nll_alpha * nll_loss(chosen, batch["loss_mask"][:half, 1:].sum(-1))
        sync = stage != "train"
        size = chosen.shape[0]
        self.log(f"{stage}/loss", loss, prog_bar=True, sync_dist=sync, batch_size=size)
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": chosen.detach().mean(),
            "logps/rejected": rejected.detach().mean(),
        }
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=sync, batch_size=size)
        return loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DPO loss at global step {self.global_step}, "
                                     f"batch {batch_idx} (pairs {batch['index'].tolist()})")
        self.log_throughput(int(batch["attention_mask"].sum()))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    @torch.no_grad()
    def chosen_logprob_per_token(self, batches: int = 2) -> tuple[float, float]:
        """Mean log-prob per chosen response token under the policy now and under the reference,
        over the first `batches` training batches of every rank (all ranks must call it: the
        forwards may be collective).

        A policy that lost (nearly) all of the reference's advantage over uniform guessing on
        the responses DPO taught it to prefer has been destroyed, typically by too large a step
        size; its weights can still be finite, so a loss check alone does not see it.
        """
        was_training = self.policy.training
        self.policy.eval()
        total = torch.zeros(3, device=self.device, dtype=torch.float64)  # policy sum, reference sum, tokens
        try:
            for i, batch in enumerate(self.trainer.datamodule.train_dataloader()):
                if i == batches:
                    break
                batch = self.transfer_batch_to_device(batch, self.device, 0)
                chosen, _ = self._batch_logps(self.policy, batch)
                ref_chosen, _ = self.reference_logps(batch, "train")
                tokens = batch["loss_mask"][: chosen.shape[0], 1:].sum()
                total += torch.stack([chosen.sum(), ref_chosen.sum(), tokens]).double()
        finally:
            self.policy.train(was_training)
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        tokens = total[2].clamp_min(1)
        return float(total[0] / tokens), float(total[1] / tokens)
