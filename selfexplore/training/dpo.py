"""StepDPOModule: DPO on (step-level) preference pairs, with three ways to hold the reference.

- `copy`: a frozen second model (simple; twice the weights in memory).
- `adapter`: the policy with its LoRA adapter disabled (no second copy; LoRA/QLoRA only).
- `precomputed` (default): reference log-probs computed once before training, cached on disk
  under a key of the reference weights' content hash and the tokenized data's fingerprint, so
  a stale cache can never be reused silently; training then runs one model only.

Chosen and rejected go through one concatenated forward ([2B, L]).
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from selfexplore.models import ModelSpec, load_model
from selfexplore.models.files import local_model_path
from selfexplore.training.losses import dpo_loss, nll_loss, sequence_logps
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig
from selfexplore.training.policy import PolicyModule

ReferenceMode = Literal["precomputed", "copy", "adapter"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model")


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
            with file.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


class StepDPOModule(PolicyModule):
    """Step-level DPO (Self-Explore) or outcome DPO, depending only on the pairs it is fed.

    Args (beyond `PolicyModule`'s):
        beta, loss_type, label_smoothing: see `selfexplore.training.losses.dpo_loss`.
        nll_alpha: weight of an NLL term on the chosen responses (RPO-style); 0 = plain DPO.
        average_logps: average log-probs over response tokens instead of summing (the paper sums).
        reference: 'precomputed' | 'copy' | 'adapter' (see module docstring).
        reference_path: the reference checkpoint; by default the one the policy starts from
            (the paper: policy and reference both start from the RFT model).
        reference_cache_dir: where precomputed reference log-probs are cached
            (default: `<trainer.default_root_dir>/reference_cache`).
    """

    def __init__(
        self,
        model: ModelSpec,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid",
        label_smoothing: float = 0.0,
        nll_alpha: float = 0.0,
        average_logps: bool = False,
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
        dpo_loss(*torch.zeros(4, 1), beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)  # validate
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.nll_alpha = nll_alpha
        self.average_logps = average_logps
        self.reference_mode = reference
        self.reference_path = reference_path
        self.reference_cache_dir = reference_cache_dir
        self.reference_model: torch.nn.Module | None = None
        # split -> (data fingerprint, [N, 2] table of chosen / rejected reference log-probs)
        self.reference_tables: dict[str, tuple[str, torch.Tensor]] = {}

    # ----- reference -----------------------------------------------------------------------
    def _load_reference(self) -> torch.nn.Module:
        spec = ModelSpec(path=self.reference_path or self.model_spec.path, dtype=self.model_spec.dtype,
                         trust_remote_code=self.model_spec.trust_remote_code,
                         adapter_path=None if self.reference_path else self.model_spec.adapter_path)
        model = load_model(spec, for_training=False).to(self.device).eval()
        model.requires_grad_(False)
        return model

    def configure_model(self) -> None:
        super().configure_model()
        if self.reference_mode == "copy" and self.reference_model is None:
            self.reference_model = self._load_reference()

    def _batch_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps = sequence_logps(logits, batch["input_ids"], batch["loss_mask"], average=self.average_logps)
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
        payload = {"reference": checkpoint_fingerprint(*source), "data": data_fingerprint,
                   "average_logps": self.average_logps, "dtype": self.model_spec.dtype,
                   "quantization": self.model_spec.quantization}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def precompute_reference(self, dataset: Any, datamodule: Any) -> torch.Tensor:
        """Reference log-probs of every pair of `dataset`, from the cache when its key matches.

        Without `reference_path` the reference is the policy's starting point, so this must run
        before the first optimizer step (it does: `on_fit_start`).
        Every rank runs the same full pass (sharded forwards are collective under FSDP2), so
        no gather is needed; rank 0 writes the cache atomically.
        """
        cache_dir = Path(self.reference_cache_dir or Path(self.trainer.default_root_dir) / "reference_cache")
        cache = cache_dir / f"{self.reference_cache_key(dataset.fingerprint())}.pt"  # fingerprint: tokenized data
        if cache.is_file():
            table = torch.load(cache, map_location="cpu")
            if table.shape == (len(dataset), 2):
                rank_zero_info(f"Reference log-probs: reusing {cache}")
                return table
        table = torch.empty(len(dataset), 2)
        loader = DataLoader(dataset, batch_size=datamodule.batch_size, shuffle=False, collate_fn=datamodule.collate)
        use_policy = self.reference_path is None
        if use_policy and self.global_step > 0:
            raise RuntimeError("reference log-probs are needed after training started, when the policy no "
                               "longer equals the reference: set reference_path")
        model = self.policy if use_policy else self._load_reference()
        was_training = model.training
        model.eval()
        with torch.no_grad():
            adapter_off = self.policy.disable_adapter() if use_policy and hasattr(self.policy, "disable_adapter") \
                else nullcontext()
            with adapter_off:
                for batch in loader:
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    chosen, rejected = self._batch_logps(model, batch)
                    table[batch["index"].cpu()] = torch.stack([chosen, rejected], dim=1).float().cpu()
        model.train(was_training)
        if not use_policy:
            del model
        if self.global_rank == 0:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            torch.save(table, tmp)
            tmp.replace(cache)
        rank_zero_info(f"Reference log-probs: computed {len(dataset)} pairs, cached at {cache}")
        return table

    # ----- steps ---------------------------------------------------------------------------
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        chosen, rejected = self._batch_logps(self.policy, batch)
        ref_chosen, ref_rejected = self.reference_logps(batch, "train" if stage == "train" else "val")
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss_type, self.label_smoothing)
        loss = losses.mean()
        if self.nll_alpha:
            half = batch["loss_mask"].shape[0] // 2
            loss = loss + self.nll_alpha * nll_loss(chosen, batch["loss_mask"][:half, 1:].sum(-1))
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
