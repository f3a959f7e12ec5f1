"""SFT stage: loss masking, a fit that learns, CLI fit/validate/test, LoRA/QLoRA, export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer

from selfexplore.data.sft import SFTDataModule, tokenize_sft
from selfexplore.io import DataError
from selfexplore.models import LoraSpec, ModelSpec, load_tokenizer
from selfexplore.training.optim import OptimizerConfig
from selfexplore.training.sft import SFTModule

REPO = Path(__file__).resolve().parents[1]
TINY_ARITH = dict(train_size=64, validation_size=16, test_size=16, min_steps=2, max_steps=2, max_operand=20)


def _trainer(tmp_path: Path, **kw) -> Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                    default_root_dir=tmp_path)
    return Trainer(**{**defaults, **kw})


def _fixed_batch_loss(module: SFTModule, dm: SFTDataModule) -> float:
    batch = dm._collate_train(dm.train_set.examples[:32])
    module.policy.eval()
    with torch.no_grad():
        return float(module.policy(**batch).loss)


def test_prompt_tokens_carry_no_loss(tiny_arith_model: Path) -> None:
    tok = load_tokenizer(tiny_arith_model)
    pairs = [("Ava has 3 marbles.\n", "3 + 4 = 7\nThe answer is 7")]
    (ex,), _ = tokenize_sft(tok, pairs, max_length=128, include_prompt=False, overlong="drop")
    n_prompt = len(tok(pairs[0][0]).input_ids)
    assert ex.labels[:n_prompt] == [-100] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.input_ids[-1] == tok.eos_token_id
    assert tok.decode(ex.input_ids[n_prompt:-1]) == pairs[0][1]
    (ex_all,), _ = tokenize_sft(tok, pairs, max_length=128, include_prompt=True, overlong="drop")
    assert -100 not in ex_all.labels


def test_overlong_examples_are_counted(tiny_arith_model: Path) -> None:
    tok = load_tokenizer(tiny_arith_model)
    pairs = [("Q\n", "1 + 1 = 2\n" * 20 + "The answer is 2"), ("Q\n", "The answer is 2")]
    kept, stats = tokenize_sft(tok, pairs, max_length=30, include_prompt=False, overlong="drop")
    assert len(kept) == 1 and stats["dropped_overlong"] == 1
    kept, stats = tokenize_sft(tok, pairs, max_length=30, include_prompt=False, overlong="truncate")
    assert len(kept) == 2 and stats["truncated"] == 1 and max(len(e.input_ids) for e in kept) == 30


def test_fit_lowers_loss_and_export_reloads_same_logits(tiny_arith_model: Path, tmp_path: Path) -> None:
    module = SFTModule(ModelSpec(path=str(tiny_arith_model)), optimizer=OptimizerConfig(lr=3e-3),
                       eval_max_new_tokens=24, export_dir=str(tmp_path / "policy"))
    dm = SFTDataModule(task="arith", task_options=TINY_ARITH, batch_size=16, max_length=128,
                       tokenizer_path=str(tiny_arith_model))
    trainer = _trainer(tmp_path, max_steps=40, limit_val_batches=1, check_val_every_n_epoch=5)
    module.configure_model()
    dm.setup("fit")
    before = _fixed_batch_loss(module, dm)
    trainer.fit(module, datamodule=dm)
    after = _fixed_batch_loss(module, dm)
    assert after < before - 0.5, (before, after)
    assert "val/accuracy" in trainer.callback_metrics

    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ids = dm._collate_train(dm.train_set.examples[:4])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, module.policy.eval()(**ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_lora_and_qlora_fit_train_only_adapters(tiny_arith_model: Path, tmp_path: Path, quantization) -> None:
    spec = ModelSpec(path=str(tiny_arith_model), lora=LoraSpec(r=4, alpha=8, dropout=0.0), quantization=quantization)
    module = SFTModule(spec, optimizer=OptimizerConfig(lr=1e-2))
    dm = SFTDataModule(task="arith", task_options=TINY_ARITH, batch_size=8, max_length=128)
    module.configure_model()
    frozen = {n: p.detach().clone() for n, p in module.policy.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    _trainer(tmp_path, max_steps=5, limit_val_batches=0).fit(module, datamodule=dm)
    params = dict(module.policy.named_parameters())
    assert any(not torch.equal(params[n].detach(), v) for n, v in adapters.items())
    assert all(torch.equal(params[n].detach(), v) for n, v in frozen.items())


def test_clear_errors_before_training(tiny_arith_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task"):
        SFTDataModule(task="no-such-task")
    with pytest.raises(Exception, match="does-not-exist"):
        SFTModule(ModelSpec(path=str(tmp_path / "does-not-exist"))).configure_model()
    bad = tmp_path / "rft.jsonl"
    bad.write_text(json.dumps({"prompt": "Q\n", "response": "1 + 1 = 2\n" * 50 + "The answer is 2"}) + "\n")
    module = SFTModule(ModelSpec(path=str(tiny_arith_model)))
    dm = SFTDataModule(task="arith", task_options=TINY_ARITH, train_path=str(bad), max_length=32)
    with pytest.raises(DataError, match="no usable training examples"):
        _trainer(tmp_path, max_steps=1).fit(module, datamodule=dm)
    missing_field = tmp_path / "bad.jsonl"
    missing_field.write_text(json.dumps({"prompt": "Q\n"}) + "\n")
    dm = SFTDataModule(task="arith", task_options=TINY_ARITH, train_path=str(missing_field))
    with pytest.raises(DataError, match=r"bad\.jsonl.*line 1.*response"):
        _trainer(tmp_path, max_steps=1).fit(SFTModule(ModelSpec(path=str(tiny_arith_model))), datamodule=dm)


def _write_config(tmp_path: Path, model_path: str, **trainer) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 6, "enable_progress_bar": False,
                    "log_every_n_steps": 1, "limit_val_batches": 1, "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "logs")}}, **trainer},
        "model": {"class_path": "selfexplore.training.sft.SFTModule",
                  "init_args": {"model": {"path": model_path}, "eval_max_new_tokens": 16,
                                "export_dir": str(tmp_path / "policy")}},
        "data": {"class_path": "selfexplore.data.sft.SFTDataModule",
                 "init_args": {"task": "arith", "task_options": TINY_ARITH, "batch_size": 8,
                               "max_length": 128, "val_limit": 8, "test_limit": 8}},
    }
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _logged(tmp_path: Path, key: str) -> list[float]:
    values = []
    for metrics in (tmp_path / "logs").rglob("metrics.csv"):
        with metrics.open() as f:
            values += [float(row[key]) for row in csv.DictReader(f) if row.get(key)]
    return values


def test_cli_fit_validate_test_from_yaml(tiny_arith_model: Path, tmp_path: Path) -> None:
    from selfexplore.cli import main

    config = _write_config(tmp_path, str(tiny_arith_model))
    main(["fit", "--config", str(config)])
    assert (tmp_path / "policy" / "config.json").is_file()
    exported = ["--model.init_args.model.path", str(tmp_path / "policy")]
    main(["validate", "--config", str(config), *exported])
    main(["test", "--config", str(config), *exported])
    assert _logged(tmp_path, "train/loss") and _logged(tmp_path, "val/accuracy")
    assert len(_logged(tmp_path, "test/accuracy")) == 1


def test_print_config_parses_quickstart() -> None:
    out = subprocess.run([sys.executable, "-m", "selfexplore.cli", "fit", "--config",
                          str(REPO / "configs/quickstart/sft.yaml"), "--print_config"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    printed = yaml.safe_load(out.stdout)
    assert printed["model"]["class_path"] == "selfexplore.training.sft.SFTModule"
    assert printed["model"]["init_args"]["from_scratch"]["hidden_size"] == 128


@pytest.mark.slow
def test_fsdp2_two_process_fit_on_cpu(tiny_arith_model: Path, tmp_path: Path) -> None:
    """FSDP2 (fully_shard through ModelParallelStrategy) with 2 gloo processes on CPU.

    Validation decodes greedily on both ranks too (sharded weights are gathered per layer, so
    `generate` must run in step on every rank: the model is marked FSDP-managed for that).
    """
    config = _write_config(tmp_path, str(tiny_arith_model), devices=2, val_check_interval=3,
                           strategy={"class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
                                     "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "selfexplore.cli", "fit", "--config", str(config)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    losses = _logged(tmp_path, "train/loss")
    assert losses and all(v == v for v in losses)
    assert len(_logged(tmp_path, "val/accuracy")) == 2
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
