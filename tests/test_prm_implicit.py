"""The DPO policy's implicit step reward: spans, the pure reward, and agreement with DPO's own reward."""

from __future__ import annotations

import pytest
import torch

from selfexplore.models import ModelSpec, load_tokenizer
from selfexplore.prm.implicit import ImplicitRewardScorer, implicit_step_rewards, step_spans, token_logps
from selfexplore.prm.metrics import evaluate_scores
from selfexplore.training.losses import sequence_logps

PROMPT = "Ava has 23 marbles. She finds 17 more. How many?\n"
STEPS = ["Ava starts with 23 marbles.", "23 + 17 = 40", "The answer is 40"]


def test_pure_reward_sums_each_span() -> None:
    pi, ref = torch.tensor([0.0, -1.0, -2.0, -1.0, -0.5]), torch.tensor([0.0, -2.0, -2.0, -3.0, -0.5])
    assert implicit_step_rewards(pi, ref, [(1, 3), (3, 5)], beta=0.5) == [0.5, 1.0]


def test_spans_cover_each_step_and_its_newline(tiny_arith_model) -> None:
    tok = load_tokenizer(str(tiny_arith_model))
    ids, spans = step_spans(tok, PROMPT, STEPS)
    assert spans[0][0] == len(tok(PROMPT).input_ids) and spans[-1][1] == len(ids)
    texts = [tok.decode(ids[a:b]) for a, b in spans]
    assert texts == [STEPS[0] + "\n", STEPS[1] + "\n", STEPS[2]]


@pytest.fixture(scope="module")
def policy_dir(tiny_arith_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from selfexplore.models.tokenizer import save_tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_arith_model))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("implicit") / "policy"
    model.save_pretrained(out)
    save_tokenizer(load_tokenizer(str(tiny_arith_model)), out)
    return out


def test_step_rewards_add_up_to_dpo_reward(tiny_arith_model, policy_dir) -> None:
    scorer = ImplicitRewardScorer(ModelSpec(path=str(policy_dir)), ModelSpec(path=str(tiny_arith_model)), beta=0.1)
    (rewards,) = scorer.score([PROMPT], [STEPS])
    ids, spans = step_spans(scorer.tokenizer, PROMPT, STEPS)
    row = torch.tensor([ids])
    mask = torch.zeros_like(row, dtype=torch.bool)
    mask[0, spans[0][0]:] = True
    with torch.no_grad():
        dpo = [sequence_logps(m(input_ids=row).logits, row, mask) for m in (scorer.policy, scorer.reference)]
    assert sum(rewards) == pytest.approx(0.1 * float(dpo[0] - dpo[1]), abs=1e-4)
    assert all(r != 0 for r in rewards)
    same = ImplicitRewardScorer(ModelSpec(path=str(policy_dir)), ModelSpec(path=str(policy_dir)))
    assert same.score([PROMPT, PROMPT + "x"], [STEPS, STEPS[:1]]) == [[0.0] * 3, [0.0]]
    batched = token_logps(scorer.policy, [ids, ids[:5]], scorer.pad_id)  # padding changes nothing
    assert torch.allclose(batched[1], token_logps(scorer.policy, [ids[:5]], scorer.pad_id)[0], atol=1e-5)


def test_any_scorer_gets_the_same_metrics() -> None:
    labels = [[True, False], [True, True, False], [True, True]]
    flag_last = [[1.0] * (len(x) - 1) + [-1.0] for x in labels]  # the baseline: always flags the last step
    out = evaluate_scores(flag_last, labels, threshold=0.0)
    assert (out["acc_err"], out["acc_cor"], out["f1"]) == (1.0, 0.0, 0.0)
    assert out["auroc"] == pytest.approx(0.9)  # 4 of 5 good steps above both bad ones, one tie each
