"""DPO losses, sequence log-probs, NLL term, lr schedule and optimizer wiring."""

from __future__ import annotations

import math

import pytest
import torch

from selfexplore.training.losses import dpo_loss, nll_loss, selective_log_softmax, sequence_logps
from selfexplore.training.optim import OptimizerConfig, SchedulerConfig, configure_optimizers, lr_lambda
from selfexplore.validation import raise_problems


def _logps(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# Two pairs. Pair 0: h = (-1 - -3) - (-2 - -2) = 2. Pair 1: h = (-4 - -2) - (-3 - -3) = -2.
PC, PR, RC, RR = (-1.0, -4.0), (-3.0, -2.0), (-2.0, -3.0), (-2.0, -3.0)


def _softplus(x: float) -> float:  # -log(sigmoid(-x))
    return math.log1p(math.exp(x))


def test_sigmoid_loss_and_rewards_match_hand_computation():
    losses, chosen_r, rejected_r = dpo_loss(_logps(*PC), _logps(*PR), _logps(*RC), _logps(*RR), beta=0.5)
    # -logsigmoid(beta*h) = softplus(-beta*h); beta*h = 1 and -1
    assert losses.tolist() == pytest.approx([_softplus(-1.0), _softplus(1.0)])
    assert losses[0].item() == pytest.approx(0.3132617)
    assert chosen_r.tolist() == pytest.approx([0.5 * (-1 + 2), 0.5 * (-4 + 3)])
    assert rejected_r.tolist() == pytest.approx([0.5 * (-3 + 2), 0.5 * (-2 + 3)])


def test_sigmoid_label_smoothing_is_conservative_dpo():
    losses, _, _ = dpo_loss(_logps(*PC), _logps(*PR), _logps(*RC), _logps(*RR), beta=0.5, label_smoothing=0.2)
    expected0 = 0.8 * _softplus(-1.0) + 0.2 * _softplus(1.0)
    expected1 = 0.8 * _softplus(1.0) + 0.2 * _softplus(-1.0)
    assert losses.tolist() == pytest.approx([expected0, expected1])
    assert losses[0].item() == pytest.approx(0.5132617)


def test_ipo_loss():
    losses, _, _ = dpo_loss(_logps(*PC), _logps(*PR), _logps(*RC), _logps(*RR), beta=0.5, loss_type="ipo")
    # (h - 1/(2*0.5))^2 = (2-1)^2, (-2-1)^2
    assert losses.tolist() == pytest.approx([1.0, 9.0])


def test_hinge_loss():
    losses, _, _ = dpo_loss(_logps(*PC), _logps(*PR), _logps(*RC), _logps(*RR), beta=0.25, loss_type="hinge")
    # relu(1 - 0.25*h): h=2 -> 0.5, h=-2 -> 1.5
    assert losses.tolist() == pytest.approx([0.5, 1.5])
    losses, _, _ = dpo_loss(_logps(*PC), _logps(*PR), _logps(*RC), _logps(*RR), beta=1.0, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.0, 3.0])


def test_gradient_favours_chosen_and_rewards_are_detached():
    pc, pr = _logps(-5.0, grad=True), _logps(-5.0, grad=True)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, _logps(-5.0), _logps(-5.0), beta=0.1)
    assert losses.item() == pytest.approx(math.log(2.0))
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises chosen, lowers rejected
    assert pc.grad.item() == pytest.approx(-0.05)  # -beta * sigmoid(0)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "kto"}, "unknown loss_type"),
    ({"beta": 0.0}, "beta must be > 0"),
    ({"beta": -0.1}, "beta must be > 0"),
    ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
    ({"label_smoothing": 0.1, "loss_type": "ipo"}, "only applies to loss_type='sigmoid'"),
])
def test_invalid_arguments(kwargs, match):
    x = _logps(-1.0)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(_logps(-1.0, -2.0), _logps(-1.0), _logps(-1.0), _logps(-1.0))


def _brute_force_logps(logits, labels, mask, average):
    out = []
    for n in range(logits.shape[0]):
        total, count = 0.0, 0
        for t in range(1, logits.shape[1]):
            if mask[n, t]:
                total += torch.log_softmax(logits[n, t - 1].double(), -1)[labels[n, t]].item()
                count += 1
        out.append(total / max(count, 1) if average else total)
    return out


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logps_matches_brute_force(average):
    g = torch.Generator().manual_seed(0)
    n, length, vocab = 4, 9, 11
    logits = torch.randn(n, length, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for row, (start, end) in enumerate([(3, 9), (1, 5), (6, 7), (2, 8)]):  # prompt, completion, padding
        mask[row, start:end] = True
    labels_with_ignore = labels.masked_fill(~mask, -100)  # unread outside the mask
    got = sequence_logps(logits, labels_with_ignore, mask, average=average)
    assert got.shape == (n,)
    assert got.tolist() == pytest.approx(_brute_force_logps(logits, labels, mask, average), rel=1e-5)


def _full_token_logps(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The plain computation selective_log_softmax replaces: an fp32 log-softmax of every row."""
    return torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1) * mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1, 13 * 3, 1 << 24])  # one row, 3 rows, everything per chunk
def test_selective_log_softmax_equals_full_log_softmax_and_its_gradient(dtype, chunk_elements):
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 13, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 13, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) > 0.4
    weights = torch.randn(3, 7, generator=g)  # a downstream loss that weighs every position differently
    grads = []
    for fn in (lambda x: selective_log_softmax(x, targets, mask, chunk_elements=chunk_elements),
               lambda x: _full_token_logps(x, targets, mask)):
        x = logits.clone().requires_grad_(True)
        out = fn(x)
        (out * weights).sum().backward()
        grads.append((out.detach(), x.grad))
    (got, got_grad), (want, want_grad) = grads
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert bool((got[~mask] == 0).all())
    assert got_grad.dtype == dtype
    torch.testing.assert_close(got_grad.float(), want_grad.float(), atol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_sequence_logps_shape_mismatch():
    with pytest.raises(ValueError, match="shape mismatch"):
        sequence_logps(torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4))


def test_nll_loss_is_token_level_mean_over_batch():
    # example 0: 2 tokens, logp sum -3; example 1: 4 tokens, logp sum -1 -> 4 / 6 nats per token
    loss = nll_loss(torch.tensor([-3.0, -1.0]), torch.tensor([2, 4]))
    assert loss.item() == pytest.approx(4.0 / 6.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        nll_loss(torch.tensor([-3.0, -1.0]), torch.tensor([2]))


# ----- learning-rate schedule ------------------------------------------------------------------

def test_lr_lambda_warmup_then_linear_to_zero():
    values = [lr_lambda(s, total=10, warmup=4, name="linear") for s in range(11)]
    assert values[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert values[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])


def test_lr_lambda_cosine_and_floor():
    assert lr_lambda(0, total=10, warmup=0, name="cosine") == pytest.approx(1.0)
    assert lr_lambda(5, total=10, warmup=0, name="cosine") == pytest.approx(0.5)
    assert lr_lambda(10, total=10, warmup=0, name="cosine") == pytest.approx(0.0)
    assert lr_lambda(10, total=10, warmup=0, name="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_lambda(5, total=10, warmup=0, name="linear", min_ratio=0.2) == pytest.approx(0.6)
    assert lr_lambda(12, total=10, warmup=0, name="linear", min_ratio=0.2) == pytest.approx(0.2)


def test_lr_lambda_constant_after_warmup():
    assert [lr_lambda(s, total=6, warmup=2, name="constant") for s in range(6)] == pytest.approx(
        [0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_lambda(0, total=6, warmup=2, name="step")


def test_scheduler_config_warmup_and_validation():
    assert SchedulerConfig(warmup_ratio=0.1).num_warmup_steps(25) == 3  # ceil(2.5)
    assert SchedulerConfig(warmup_ratio=0.1, warmup_steps=7).num_warmup_steps(25) == 7
    for bad, field in (({"name": "poly"}, "name"), ({"warmup_ratio": 1.5}, "warmup_ratio"),
                       ({"warmup_steps": -1}, "warmup_steps"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")):
        assert [p.split(" ")[0] for p in SchedulerConfig(**bad).problems()] == [f"scheduler.{field}"]


def test_optimizer_config_validation():
    assert OptimizerConfig(betas=[0.9, 0.95]).betas == (0.9, 0.95)  # YAML list -> tuple
    for bad, field in (({"name": "lion"}, "name"), ({"lr": 0.0}, "lr"), ({"weight_decay": -1.0}, "weight_decay"),
                       ({"betas": (0.9,)}, "betas"), ({"eps": 0.0}, "eps"),
                       ({"momentum": 0.9}, "momentum")):  # momentum with adamw
        assert [p.split(" ")[0] for p in OptimizerConfig(**bad).problems()] == [f"optimizer.{field}"]
    with pytest.raises(ValueError, match=r"optimizer\.lr must be > 0.*\n.*optimizer\.eps must be > 0"):
        raise_problems(OptimizerConfig(lr=0.0, eps=0.0).problems(), "optimizer")  # every problem, one error


# ----- optimizers ------------------------------------------------------------------------------

def _params():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
    model[0].bias.requires_grad_(False)  # frozen params are left out
    return model


def _train_steps(model, config: dict, steps: int) -> list[float]:
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        loss = model(torch.ones(2, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("name, cls_name", [("adamw", "AdamW"), ("rmsprop", "RMSprop"), ("sgd", "SGD")])
def test_configure_optimizers(name, cls_name):
    model = _params()
    before = model[1].weight.detach().clone()
    opt = OptimizerConfig(name=name, lr=1e-2, weight_decay=0.01, momentum=0.0 if name == "adamw" else 0.5)
    config = configure_optimizers(model.parameters(), opt, SchedulerConfig(name="linear", warmup_steps=2), 6)
    assert config["lr_scheduler"]["interval"] == "step"
    optimizer = config["optimizer"]
    assert type(optimizer).__name__ == cls_name
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 3
    assert optimizer.param_groups[0]["weight_decay"] == 0.01
    lrs = _train_steps(model, config, 6)
    assert lrs == pytest.approx([1e-2 * lr_lambda(s, 6, 2, "linear") for s in range(6)])
    assert not torch.equal(before, model[1].weight)


def test_configure_optimizers_adamw8bit():
    pytest.importorskip("bitsandbytes")
    model = _params()
    try:
        config = configure_optimizers(model.parameters(), OptimizerConfig(name="adamw8bit", lr=1e-2),
                                      SchedulerConfig(name="constant"), 3)
        _train_steps(model, config, 2)
    except (RuntimeError, NotImplementedError) as e:  # no CPU kernels in this bitsandbytes build
        pytest.skip(f"bitsandbytes 8-bit optimizer unavailable on CPU: {e}")
    assert type(config["optimizer"]).__name__ == "AdamW8bit"


def test_configure_optimizers_rejects_bad_totals():
    model = _params()
    with pytest.raises(ValueError, match="total_steps"):
        configure_optimizers(model.parameters(), OptimizerConfig(), SchedulerConfig(), 0)
    with pytest.raises(ValueError, match="total_steps"):
        configure_optimizers(model.parameters(), OptimizerConfig(), SchedulerConfig(), math.inf)
    with pytest.raises(ValueError, match="longer than training"):
        configure_optimizers(model.parameters(), OptimizerConfig(), SchedulerConfig(warmup_steps=9), 5)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        configure_optimizers(frozen.parameters(), OptimizerConfig(), SchedulerConfig(), 5)
