"""StepDPOModule: learning on pairs, reference modes agree, cache keys, QLoRA, FSDP2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file, save_file

from selfexplore.data.preference import PreferenceDataModule
from selfexplore.models import LoraSpec, ModelSpec
from selfexplore.training.dpo import StepDPOModule
from selfexplore.training.losses import DPOLossConfig, dpo_loss
from selfexplore.training.optim import OptimizerConfig


def _pairs(path: Path, n: int = 24) -> Path:
    """Step-level pairs: a prompt ending mid-rationale, a right next step and a wrong one."""
    rows = []
    for i in range(n):
        a, b = 3 + i, 4 + (i % 5)
        prompt = f"Ava has {a} marbles. She finds {b} more. How many marbles does Ava have now?\n" \
                 f"Ava starts with {a} marbles.\n"
        rows.append({"prompt": prompt, "chosen": f"{a} + {b} = {a + b}\nThe answer is {a + b}",
                     "rejected": f"{a} * {b} = {a * b}\nThe answer is {a * b}",
                     "meta": {"question_id": str(i)}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _trainer(tmp_path: Path, **kw) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=tmp_path)
    return Trainer(**{**defaults, **kw})


def _datamodule(pairs: Path, **kw) -> PreferenceDataModule:
    return PreferenceDataModule(train_path=str(pairs), max_length=96, max_prompt_length=64, batch_size=8, **kw)


def _metrics_on(module: StepDPOModule, dm: PreferenceDataModule) -> dict[str, float]:
    """Mean margin and accuracy of the current policy over all training pairs."""
    batch = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    module.policy.eval()
    with torch.no_grad():
        chosen, rejected = module._batch_logps(module.policy, batch)
        ref_c, ref_r = module.reference_logps(batch, "train")
    margins = module.loss.beta * ((chosen - ref_c) - (rejected - ref_r))
    return {"margin": float(margins.mean()), "accuracy": float((margins > 0).float().mean())}


def test_dpo_steps_raise_margins_and_accuracy(tiny_arith_model: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    module = StepDPOModule(ModelSpec(path=str(tiny_arith_model)), loss=DPOLossConfig(beta=0.1),
                           optimizer=OptimizerConfig(lr=1e-3), export_dir=str(tmp_path / "policy"))
    dm = _datamodule(pairs)
    trainer = _trainer(tmp_path, max_steps=20)
    trainer.fit(module, datamodule=dm)
    after = _metrics_on(module, dm)
    # at step 0 the policy equals the reference: margins 0, accuracy 0 by definition. The bounds
    # leave wide headroom (this run reaches far more) so no CPU kind's rounding can flip them.
    assert after["margin"] > 0.1 and after["accuracy"] > 0.5, after
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "tokens_per_sec"):
        assert f"train/{key}" in trainer.callback_metrics
    assert (tmp_path / "policy" / "config.json").is_file()


def _prepared(model_path: Path, pairs: Path, tmp_path: Path, **kw) -> tuple[StepDPOModule, PreferenceDataModule]:
    """A module with its model built and reference tables ready, without training steps."""
    module = StepDPOModule(ModelSpec(path=str(model_path)), reference_cache_dir=str(tmp_path / "cache"), **kw)
    module.configure_model()
    dm = _datamodule(pairs, tokenizer_path=str(model_path))
    dm.setup("fit")
    module.trainer = _trainer(tmp_path)
    if module.reference_mode == "precomputed":
        module.reference_tables["train"] = ("", module.precompute_reference(dm.train_dataset, dm))
    return module, dm


def test_precomputed_reference_equals_live_copy(tiny_arith_model: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    losses = {}
    for mode in ("precomputed", "copy"):
        module, dm = _prepared(tiny_arith_model, pairs, tmp_path, reference=mode)
        with torch.no_grad():  # perturb the policy so the loss is not the trivial log(2)
            for p in module.policy.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        batch = dm.collate([dm.train_dataset[i] for i in range(8)])
        module.policy.eval()
        with torch.no_grad():
            chosen, rejected = module._batch_logps(module.policy, batch)
            losses[mode] = dpo_loss(chosen, rejected, *module.reference_logps(batch, "train"))[0].mean()
    torch.testing.assert_close(losses["precomputed"], losses["copy"], atol=1e-5, rtol=1e-5)
    assert abs(float(losses["copy"]) - 0.6931) > 1e-3


def test_reference_cache_reused_and_never_stale(tiny_arith_model: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    module, dm = _prepared(tiny_arith_model, pairs, tmp_path)
    cached = list((tmp_path / "cache").glob("*.pt"))
    key = module.reference_cache_key(dm.train_dataset.fingerprint())
    assert [c.stem for c in cached] == [key]
    table = module.reference_tables["train"][1]
    torch.save(table + 1.0, cached[0])  # a reused cache is read back, not recomputed
    torch.testing.assert_close(module.precompute_reference(dm.train_dataset, dm), table + 1.0)
    # other data -> other key; other reference weights -> other key
    assert module.reference_cache_key("another data fingerprint") != key
    copied = tmp_path / "ref"
    shutil.copytree(tiny_arith_model, copied)
    weights = next(copied.glob("*.safetensors"))
    state = load_file(weights)
    first = next(iter(state))
    state[first] = state[first] + 1.0
    save_file(state, weights, metadata={"format": "pt"})
    moved = StepDPOModule(ModelSpec(path=str(tiny_arith_model)), reference_path=str(copied))
    assert moved.reference_cache_key(dm.train_dataset.fingerprint()) != key


def test_adapter_disabled_reference_equals_base_model(tiny_arith_model: Path, tmp_path: Path) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    lora = StepDPOModule(ModelSpec(path=str(tiny_arith_model), lora=LoraSpec(r=4, alpha=8, dropout=0.0)),
                         reference="adapter", optimizer=OptimizerConfig(lr=1e-2))
    dm = _datamodule(pairs)
    _trainer(tmp_path, max_steps=5).fit(lora, datamodule=dm)  # adapters move away from zero
    base, _ = _prepared(tiny_arith_model, pairs, tmp_path, reference="copy")
    batch = dm.collate([dm.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        ref_c, ref_r = lora.reference_logps(batch, "train")
        base_c, base_r = base._batch_logps(base.policy.eval(), batch)
        pol_c, _ = lora._batch_logps(lora.policy.eval(), batch)
    torch.testing.assert_close(ref_c, base_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_r, base_r, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pol_c, base_c, atol=1e-4)


def test_qlora_dpo_steps(tiny_arith_model: Path, tmp_path: Path) -> None:
    spec = ModelSpec(path=str(tiny_arith_model), lora=LoraSpec(r=4, alpha=8, dropout=0.0), quantization="nf4")
    module = StepDPOModule(spec, reference="adapter", optimizer=OptimizerConfig(lr=1e-2))
    trainer = _trainer(tmp_path, max_steps=3)
    trainer.fit(module, datamodule=_datamodule(_pairs(tmp_path / "pairs.jsonl")))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_invalid_configuration_is_rejected(tiny_arith_model: Path) -> None:
    with pytest.raises(ValueError, match="LoRA"):
        StepDPOModule(ModelSpec(path=str(tiny_arith_model)), reference="adapter")
    with pytest.raises(ValueError, match="loss_type"):
        StepDPOModule(ModelSpec(path=str(tiny_arith_model)), loss=DPOLossConfig(loss_type="nope"))


def test_non_finite_loss_names_step_and_batch(tiny_arith_model: Path, tmp_path: Path) -> None:
    module = StepDPOModule(ModelSpec(path=str(tiny_arith_model)), reference="copy")
    module.configure_model()
    with torch.no_grad():
        module.policy.get_input_embeddings().weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"global step 0, batch 0"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=_datamodule(_pairs(tmp_path / "pairs.jsonl")))


def _count_model_builds(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """How often a model is read from a checkpoint or built from a config from now on."""
    from transformers import AutoModelForCausalLM

    counts = {"from_pretrained": 0, "from_config": 0}
    for name in counts:
        original = getattr(AutoModelForCausalLM, name).__func__

        def counted(cls, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(cls, *args, **kwargs)
        monkeypatch.setattr(AutoModelForCausalLM, name, classmethod(counted))
    return counts


@pytest.mark.parametrize("same_path", [False, True])  # reference_path unset, or the policy's own path
def test_reference_equal_to_the_start_is_computed_by_the_policy_alone(
        tiny_arith_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, same_path: bool) -> None:
    pairs = _pairs(tmp_path / "pairs.jsonl")
    counts = _count_model_builds(monkeypatch)
    module, dm = _prepared(tiny_arith_model, pairs, tmp_path,
                           reference_path=str(tiny_arith_model) if same_path else None)
    assert module.reference_is_start()
    assert counts == {"from_pretrained": 1, "from_config": 0}  # the policy; no second model for the reference
    batch = dm.collate([dm.train_dataset[i] for i in range(len(dm.train_dataset))])
    module.policy.eval()
    with torch.no_grad():  # at step 0 the policy is the reference: every margin is exactly what it scores
        chosen, rejected = module._batch_logps(module.policy, batch)
    ref_chosen, ref_rejected = module.reference_logps(batch, "train")
    torch.testing.assert_close(ref_chosen, chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_rejected, rejected, atol=1e-5, rtol=1e-5)
    other = StepDPOModule(ModelSpec(path=str(tiny_arith_model)), reference_path=str(tmp_path / "elsewhere"))
    assert not other.reference_is_start()


def test_bf16_precision_shards_with_a_bf16_mixed_precision_policy(tiny_arith_model: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.fsdp as fsdp

    from selfexplore.models import load_model
    from selfexplore.training.sharding import mixed_precision_policy, shard_with_fsdp2

    policies = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: policies.append(kw["mp_policy"]))
    model = load_model(ModelSpec(path=str(tiny_arith_model)))
    for precision in ("bf16-mixed", "32-true"):
        shard_with_fsdp2(model, mesh=None, mp_policy=mixed_precision_policy(precision))
    bf16, fp32 = policies[:3], policies[3:]  # 2 blocks + the root per call
    assert len(bf16) == len(fp32) == 3
    assert all(p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.float32 for p in bf16)
    assert all(p.param_dtype is None and p.reduce_dtype is None for p in fp32)
    assert mixed_precision_policy("bf16-true").param_dtype == torch.bfloat16


@pytest.mark.slow
def test_fsdp2_two_process_dpo_on_cpu(tiny_arith_model: Path, tmp_path: Path) -> None:
    """2 gloo ranks: rank 0 alone reads the checkpoint, the reference table (policy = reference,
    split across ranks) equals one process's, and the sharded policy exports without a second model."""
    pairs = _pairs(tmp_path / "pairs.jsonl")
    worker = Path(__file__).with_name("fsdp_dpo_worker.py")
    out = subprocess.run([sys.executable, str(worker), str(tiny_arith_model), str(pairs), str(tmp_path / "run")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["from_pretrained"], r["from_config"]) for r in ranks] == [(1, 0), (0, 1)]  # export builds none
    [cached] = (tmp_path / "run" / "reference_cache").glob("*.pt")
    single, _ = _prepared(tiny_arith_model, pairs, tmp_path / "single", reference_path=str(tiny_arith_model))
    torch.testing.assert_close(torch.load(cached), single.reference_tables["train"][1], atol=1e-5, rtol=1e-5)
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "policy")
    start = AutoModelForCausalLM.from_pretrained(tiny_arith_model)
    for (name, got), want in zip(exported.state_dict().items(), start.state_dict().values()):
        torch.testing.assert_close(got, want, atol=1e-2, rtol=0, msg=name)  # 2 small steps from the start


def test_a_trained_policy_never_stands_in_for_its_start_as_reference(tiny_arith_model: Path, tmp_path: Path) -> None:
    """A module trained once (an earlier fit) and asked for reference log-probs again must refuse:
    the policy no longer holds the start weights its reference path names."""
    pairs = _pairs(tmp_path / "pairs.jsonl")
    module, dm = _prepared(tiny_arith_model, pairs, tmp_path)
    module.on_before_optimizer_step(torch.optim.SGD(module.policy.parameters(), lr=0.1))
    (tmp_path / "cache").rename(tmp_path / "old_cache")  # no cached table to reuse
    with pytest.raises(RuntimeError, match="no longer equals its start weights"):
        module.precompute_reference(dm.train_dataset, dm)
