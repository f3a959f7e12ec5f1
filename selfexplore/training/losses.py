"""Pure loss functions for step-level DPO: no modules, no state, per-example tensors.

Kept free of Lightning and transformers so they can be unit-tested against hand-computed
values and reused by any trainer. Formulas follow TRL's `DPOTrainer` so results compare.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing only applies to loss_type='sigmoid', not {loss_type!r}")
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


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   average: bool = False) -> torch.Tensor:
    """Log-probability of the masked label tokens of each sequence, summed (paper) or averaged.

    ``logits`` ``[N, L, V]`` come from a causal LM run on ``labels`` ``[N, L]`` (the input ids);
    ``loss_mask`` ``[N, L]`` marks the response tokens, aligned with ``labels``. Position t's
    logits predict token t+1, so both are shifted here; label values outside the mask (pad,
    -100) are never read. Computed in fp32 without materialising a full log-softmax.
    Returns ``[N]``.
    """
    if logits.shape[:2] != labels.shape or labels.shape != loss_mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                         f"loss_mask {tuple(loss_mask.shape)}")
    logits = logits[:, :-1].float()
    mask = loss_mask[:, 1:].bool()
    targets = torch.where(mask, labels[:, 1:], torch.zeros_like(labels[:, 1:]))
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    total = (token_logps * mask).sum(-1)
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
