"""Pure loss functions for step-level DPO: no modules, no state, per-example tensors.

Kept free of Lightning and transformers so they can be unit-tested against hand-computed
values and reused by any trainer. Formulas follow TRL's `DPOTrainer` so results compare.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

LossType = Literal["sigmoid", "ipo", "hinge"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
# Where DPO's reference log-probs come from (see `selfexplore.training.dpo`): computed once
# before training, a frozen copy of the start model, or the policy with its LoRA adapter off.
ReferenceMode = Literal["precomputed", "copy", "adapter"]
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)


def check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Raise ValueError for arguments `dpo_loss` cannot use (when a config is read, not mid-run)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to loss_type='sigmoid', not {loss_type!r}")


@dataclass
class DPOLossConfig:
    """The step-DPO objective, as `fit` (StepDPOModule) and `pipeline` (dpo:) both read it.

    beta, loss_type, label_smoothing: see `dpo_loss` (the paper: sigmoid, beta 0.1).
    nll_alpha: weight of an NLL term on the chosen responses (RPO-style); 0 = plain DPO.
    average_logps: average log-probs over response tokens instead of summing (the paper sums).
    """

    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    nll_alpha: float = 0.0
    average_logps: bool = False

    def problems(self, prefix: str = "loss") -> list[str]:
        """Every invalid value, named `prefix.field`: the pipeline lists all of a config's at once."""
        problems = []
        try:
            check_dpo_args(self.beta, self.loss_type, self.label_smoothing)
        except ValueError as error:
            problems.append(f"{prefix}: {error}")
        if self.nll_alpha < 0:
            problems.append(f"{prefix}.nll_alpha must be >= 0, got {self.nll_alpha!r}")
        return problems


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO losses and implicit rewards.

    With h = (pi_c - pi_r) - (ref_c - ref_r) (sequence log-probs):
      - ``sigmoid`` (the paper): ``-(1-e) logsigmoid(beta h) - e logsigmoid(-beta h)``; e is
        ``label_smoothing`` (conservative DPO for noisy preferences; 0 = plain DPO).
      - ``ipo``: ``(h - 1/(2 beta))^2``.
      - ``hinge``: ``relu(1 - beta h)``.
    Rewards are ``beta * (policy - ref)`` per response, detached (for logging only).

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each of shape ``[B]``.
    """
    check_dpo_args(beta, loss_type, label_smoothing)
    shapes = {t.shape for t in (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)}
    if len(shapes) != 1:
        raise ValueError(f"all log-prob tensors must have the same shape, got {sorted(map(tuple, shapes))}")

    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


# fp32 elements per chunk of vocabulary rows (64 MiB): bounds the transient whatever the vocab or length.
CHUNK_ELEMENTS = 1 << 24


class _SelectiveLogSoftmax(torch.autograd.Function):
    """log_softmax(rows)[target] in fp32, one chunk of rows at a time, forward and backward.

    Autograd through `logits.float()` + `logsumexp` would keep an fp32 copy of every row for the
    backward; here only the per-row log-normaliser is saved and the softmax is recomputed per
    chunk, so the extra memory is one chunk whatever the sequence length or vocabulary.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        picked = torch.empty(rows.shape[0], dtype=torch.float32, device=flat.device)
        lse = torch.empty_like(picked)
        for start in range(0, rows.shape[0], chunk_rows):
            part = slice(start, start + chunk_rows)
            chunk = flat.index_select(0, rows[part]).float()
            lse[part] = torch.logsumexp(chunk, dim=-1)
            picked[part] = chunk.gather(-1, targets[part, None]).squeeze(-1)
        ctx.save_for_backward(flat, rows, targets, lse)
        ctx.chunk_rows = chunk_rows
        return picked - lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        flat, rows, targets, lse = ctx.saved_tensors
        grad_flat = torch.zeros_like(flat)
        for start in range(0, rows.shape[0], ctx.chunk_rows):
            part = slice(start, start + ctx.chunk_rows)
            g = grad[part, None].float()
            chunk = flat.index_select(0, rows[part]).float()
            chunk.sub_(lse[part, None]).exp_().mul_(-g)  # -softmax * g, in place: one fp32 chunk at a time
            chunk.scatter_add_(-1, targets[part, None], g)  # + onehot(target) * g
            grad_flat.index_copy_(0, rows[part], chunk.to(flat.dtype))
        return grad_flat, None, None, None


def selective_log_softmax(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                          chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``log_softmax(logits.float())`` at ``targets`` where ``mask`` is set, else 0; shape of ``targets``.

    Only the masked rows are ever read, in fp32 chunks of about `chunk_elements` values, so
    the fp32 copy of the logits that a plain log-softmax makes (MATH, 1024 tokens x 102k vocab:
    over 10 GB for a batch) never exists. Differentiable with respect to `logits`.
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)  # a view for the contiguous logits an LM head returns
    rows = mask.reshape(-1).nonzero().squeeze(-1)
    chunk_rows = max(1, chunk_elements // vocab)
    picked = _SelectiveLogSoftmax.apply(flat, rows, targets.reshape(-1)[rows], chunk_rows)
    out = torch.zeros(targets.numel(), dtype=torch.float32, device=logits.device)
    return out.index_put((rows,), picked).reshape(targets.shape)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Log-probability of the masked label tokens of each sequence, summed (paper) or averaged.

    ``logits`` ``[N, L, V]`` come from a causal LM run on ``labels`` ``[N, L]`` (the input ids);
    ``loss_mask`` ``[N, L]`` marks the response tokens, aligned with ``labels``. Position t's
    logits predict token t+1, so the labels and mask are shifted (not the logits, which would
    copy them); label values outside the mask (pad, -100) are never read. Computed in fp32 by
    `selective_log_softmax`, without an fp32 copy of the logits. Returns ``[N]``.
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    mask = F.pad(loss_mask[:, 1:].bool(), (0, 1))  # position t scores token t+1; the last scores none
    targets = torch.where(mask, F.pad(labels[:, 1:], (0, 1)), torch.zeros_like(labels))
    total = selective_log_softmax(logits, targets, mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp_min(1)
    return total


def nll_loss(chosen_logps: torch.Tensor, chosen_num_tokens: torch.Tensor) -> torch.Tensor:
    """RPO-style NLL of the chosen responses, averaged per token over the batch (a scalar).

    Takes the *summed* chosen log-probs from `sequence_logps` and the number of scored tokens
    per example (``loss_mask[:, 1:].sum(-1)``), so the forward pass is not repeated; the module
    adds ``nll_alpha * nll_loss(...)`` to the DPO loss. Same token-level mean as TRL's rpo_alpha.
    """
    if chosen_logps.shape != chosen_num_tokens.shape:
        raise ValueError(f"shape mismatch: logps {tuple(chosen_logps.shape)}, "
                         f"num_tokens {tuple(chosen_num_tokens.shape)}")
    return -chosen_logps.sum() / chosen_num_tokens.sum().clamp_min(1)
