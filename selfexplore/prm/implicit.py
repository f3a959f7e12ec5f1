"""A free verifier: the DPO policy's implicit step reward, beta * (log pi - log pi_ref) over each step.

DPO's policy defines a reward r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) up to a constant; summed
over one step's tokens it scores that step, with no verifier trained (Self-Explore trains exactly
this margin on pit steps). A step's tokens are its own ids, encoded on their own as the policy's
pairs are (`selfexplore.data.batching.encode_prompt_completion`), followed by the newline that ends
it (none after the last step). Scores are on the log-ratio scale: a step is flagged bad below
`threshold` (0: the policy likes it less than its reference did).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfexplore.data.batching import pad_right
from selfexplore.explore.pit import STEP_SEP
from selfexplore.models import ModelSpec, load_model, load_tokenizer
from selfexplore.training.losses import selective_log_softmax


def step_spans(tokenizer, prompt: str, steps: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, [start, end) token range of each step): the prompt with its special prefix, then each step's
    own ids and, but for the last step, the separator's."""
    ids = list(tokenizer(prompt).input_ids)
    sep = list(tokenizer(STEP_SEP, add_special_tokens=False).input_ids)
    spans = []
    for i, step in enumerate(steps):
        start = len(ids)
        ids.extend(tokenizer(step, add_special_tokens=False).input_ids)
        if i < len(steps) - 1:
            ids.extend(sep)
        spans.append((start, len(ids)))
    return ids, spans


def implicit_step_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor,
                          spans: Sequence[tuple[int, int]], beta: float) -> list[float]:
    """beta * sum over each span of (policy - reference) token log-probs ([L] each, aligned with the ids)."""
    ratio = policy_logps - reference_logps
    return [beta * float(ratio[a:b].sum()) for a, b in spans]


@torch.no_grad()
def token_logps(model: torch.nn.Module, rows: Sequence[Sequence[int]], pad_id: int) -> list[torch.Tensor]:
    """Per row, log p(token j | tokens < j) for every j (0 at j = 0), one padded forward."""
    ids = pad_right(rows, pad_id)
    mask = pad_right([[1] * len(r) for r in rows], 0)
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1)).to(device)
    scored = torch.nn.functional.pad(mask[:, 1:], (0, 1)).bool().to(device)
    out = selective_log_softmax(logits, targets, scored)  # position t scores token t + 1
    shifted = torch.nn.functional.pad(out[:, :-1], (1, 0))
    return [shifted[i, :len(r)].cpu() for i, r in enumerate(rows)]


class ImplicitRewardScorer:
    """Scores steps with a DPO policy against its reference (both loaded for inference).

    `score(prompts, steps)` has the verifier's interface (`StepVerifierModule.score`), so the same
    metrics (`selfexplore.prm.metrics.evaluate_scores`) and selectors take either.
    """

    def __init__(self, policy: ModelSpec, reference: ModelSpec, beta: float = 0.1) -> None:
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = beta
        self.tokenizer = load_tokenizer(policy.path)
        self.policy = load_model(policy, for_training=False)
        self.reference = load_model(reference, for_training=False)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def score(self, prompts: Sequence[str], steps: Sequence[Sequence[str]], batch_size: int = 16
              ) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [step_spans(self.tokenizer, p, s) for p, s in
                       zip(prompts[start:start + batch_size], steps[start:start + batch_size])]
            rows = [ids for ids, _ in encoded]
            pi, ref = token_logps(self.policy, rows, self.pad_id), token_logps(self.reference, rows, self.pad_id)
            out.extend(implicit_step_rewards(p, r, spans, self.beta) for p, r, (_, spans) in zip(pi, ref, encoded))
        return out
