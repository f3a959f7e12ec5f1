"""selfexplore.models: tiny Llama + tokenizer, loading (LoRA, QLoRA, adapters), export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from selfexplore.models import (
    LoraSpec,
    ModelSpec,
    TinyLlamaConfig,
    build_tiny_llama,
    export_policy,
    load_model,
    load_tokenizer,
)
from selfexplore.models import export as export_module
from selfexplore.models.tiny import init_tiny_llama

CFG = TinyLlamaConfig(hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2, intermediate_size=128,
                      max_position_embeddings=128, vocab_size=300)
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve"]
TEXTS = [f"{n} has {a} marbles.\n{a} + {b} = {a + b}\nThe answer is {a + b}"
         for i, n in enumerate(NAMES) for a, b in [(23, 17), (5 + i, 40 - i), (120 + i, 9)]]
PROMPT = "Ava has 23 marbles and finds 17 more.\n23 + 17 = "
LORA = LoraSpec(r=4, alpha=8, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(TEXTS, tmp_path_factory.mktemp("tiny") / "model", CFG, seed=0)


@pytest.fixture(scope="module")
def ids(tiny_dir) -> torch.Tensor:
    return load_tokenizer(tiny_dir)([PROMPT, TEXTS[4]], return_tensors="pt", padding=True).input_ids


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def perturb_lora(model: PeftModel, seed: int) -> None:
    """LoRA B starts at zero (adapter == identity); give it weights so adapter effects are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def test_tokenizer_round_trips_splits_digits_and_adds_only_bos(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    odd = ["  two  spaces,\ttab\n\nblank line\n", "unseen: Zoë ½ € 3.5%\n", "Wait , what ? It 's 5 . Don 't !"]
    for text in TEXTS + [PROMPT] + odd:
        enc = tok(text).input_ids
        assert enc[0] == tok.bos_token_id and tok.eos_token_id not in enc
        assert tok.decode(enc, skip_special_tokens=True) == text
    for token in tok.convert_ids_to_tokens(tok("1234567890 + 23 = 40 and 120").input_ids):
        assert not any(c.isdigit() for c in token) or token in "0123456789"
    # prompt + separately tokenized completion decodes to the concatenated text
    completion = "40\nThe answer is 40"
    joined = tok(PROMPT).input_ids + tok(completion, add_special_tokens=False).input_ids
    assert tok.decode(joined, skip_special_tokens=True) == PROMPT + completion
    assert tok.padding_side == "right" and tok.pad_token == "<pad>"
    assert AutoTokenizer.from_pretrained(tiny_dir)(PROMPT).input_ids == tok(PROMPT).input_ids
    assert json.loads((tiny_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_tokenizer_without_pad_falls_back_to_eos(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no pad token"):
        reloaded = load_tokenizer(tmp_path)
    assert reloaded.pad_token_id == reloaded.eos_token_id == tok.eos_token_id


def test_build_saves_a_seeded_reloadable_hf_folder(tiny_dir, ids, tmp_path):
    tok = load_tokenizer(tiny_dir)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_dir)
    fresh = init_tiny_llama(tok, CFG, seed=0)
    assert torch.equal(logits(reloaded, ids), logits(fresh, ids))
    assert reloaded.config.vocab_size == len(tok) <= CFG.vocab_size
    assert reloaded.config.head_dim == 32 and reloaded.config.tie_word_embeddings
    for cfg in (reloaded.config, reloaded.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    other = build_tiny_llama(TEXTS, tmp_path / "other", CFG, seed=1)
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(other), ids), logits(fresh, ids))


def test_config_validation():
    with pytest.raises(ValueError, match="head_dim = hidden_size / num_heads = 16"):
        TinyLlamaConfig(hidden_size=64, num_heads=4)
    with pytest.raises(ValueError, match="not divisible"):
        TinyLlamaConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyLlamaConfig(vocab_size=100)
    with pytest.raises(ValueError, match="needs lora or adapter_path"):
        ModelSpec(path="m", quantization="nf4")
    with pytest.raises(ValueError, match="not both"):
        ModelSpec(path="m", lora=LoraSpec(), adapter_path="a")
    with pytest.raises(ValueError, match="dtype 'float64'"):
        ModelSpec(path="m", dtype="float64")
    assert ModelSpec(path="m", lora={"r": 8}).lora == LoraSpec(r=8)


def test_missing_paths_are_named(tiny_dir, tmp_path):
    missing = tmp_path / "no" / "such_model"
    with pytest.raises(FileNotFoundError, match="such_model"):
        load_model(ModelSpec(path=str(missing)))
    with pytest.raises(FileNotFoundError, match="such_model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="such_adapter"):
        load_model(ModelSpec(path=str(tiny_dir), adapter_path=str(tmp_path / "such_adapter")))
    with pytest.raises(NotADirectoryError):
        load_model(ModelSpec(path=str(tiny_dir / "config.json")))


def test_lora_trains_only_the_adapter(tiny_dir, ids):
    model = load_model(ModelSpec(path=str(tiny_dir), lora=LORA, gradient_checkpointing=True))
    assert isinstance(model, PeftModel) and model.training
    assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    perturb_lora(model, seed=0)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any("lora_A" in n and model.get_parameter(n).grad.abs().sum() > 0 for n in with_grad)
    full = load_model(ModelSpec(path=str(tiny_dir)))
    assert full.training and all(p.requires_grad for p in full.parameters())
    frozen = load_model(ModelSpec(path=str(tiny_dir)), for_training=False)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_adapter_reload_export_and_disable(tiny_dir, ids, tmp_path):
    base = load_model(ModelSpec(path=str(tiny_dir)), for_training=False)
    policy = load_model(ModelSpec(path=str(tiny_dir), lora=LORA))
    perturb_lora(policy, seed=1)
    expected = logits(policy, ids)
    assert not torch.allclose(expected, logits(base, ids), atol=1e-3)
    with policy.disable_adapter():
        assert torch.allclose(logits(policy, ids), logits(base, ids), atol=1e-6)

    tok = load_tokenizer(tiny_dir)
    adapter_dir = export_policy(policy, tok, tmp_path / "adapter", merge=False)
    assert (adapter_dir / "adapter_config.json").is_file() and not (adapter_dir / "model.safetensors").exists()
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_dir)
    for training in (False, True):
        again = load_model(ModelSpec(path=str(tiny_dir), adapter_path=str(adapter_dir)), for_training=training)
        assert any(p.requires_grad for p in again.parameters()) == training
        assert torch.allclose(logits(again, ids), expected, atol=1e-6)

    merged_dir = export_policy(policy, tok, tmp_path / "merged", merge=True)
    assert not (merged_dir / "adapter_config.json").exists()
    merged = load_model(ModelSpec(path=str(merged_dir)), for_training=False)
    assert not isinstance(merged, PeftModel)
    # (W + sBA)x and Wx + sB(Ax) round differently: tolerance relative to the logits' scale
    assert torch.allclose(logits(merged, ids), expected, atol=1e-5 * float(expected.abs().max()))
    assert load_tokenizer(merged_dir)(PROMPT).input_ids == tok(PROMPT).input_ids
    # the live policy keeps its adapter (export merged a copy)
    assert torch.equal(logits(policy, ids), expected)

    plain_dir = export_policy(base, tok, tmp_path / "plain")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(plain_dir), ids), logits(base, ids))


def test_export_replaces_atomically(tiny_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_dir)
    out = export_policy(init_tiny_llama(tok, CFG, seed=0), tok, tmp_path / "policy")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    newer = init_tiny_llama(tok, CFG, seed=1)

    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-export")

    monkeypatch.setattr(export_module, "save_tokenizer", crash)  # weights written, then the crash
    with pytest.raises(RuntimeError, match="killed"):
        export_policy(newer, tok, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]  # no temp folders left behind
    monkeypatch.undo()
    export_policy(newer, tok, out)  # replacing a finished export works
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    assert [p.name for p in tmp_path.iterdir()] == ["policy"]


def test_specs_parse_from_yaml():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--model", type=ModelSpec)
    cfg = parser.parse_string("model:\n  path: runs/x/sft\n  quantization: nf4\n"
                              "  lora:\n    r: 8\n    target_modules: [q_proj, v_proj]\n")
    spec = parser.instantiate_classes(cfg).model
    lora = LoraSpec(r=8, target_modules=["q_proj", "v_proj"])
    assert spec == ModelSpec(path="runs/x/sft", quantization="nf4", lora=lora)


def _bnb_cpu_refusal() -> str | None:
    """Why bitsandbytes cannot quantize to nf4 on this CPU, or None when it can."""
    try:
        import bitsandbytes.functional as bnbf
        bnbf.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    except Exception as e:  # noqa: BLE001 - any failure of the probe means "no CPU backend"
        return f"bitsandbytes nf4 on CPU unavailable: {type(e).__name__}: {e}"
    return None


def test_qlora_nf4_trains_adapter_and_exports_full_precision(tiny_dir, ids, tmp_path):
    refusal = _bnb_cpu_refusal()
    if refusal:
        pytest.skip(refusal)
    from bitsandbytes.nn import Linear4bit

    model = load_model(ModelSpec(path=str(tiny_dir), lora=LORA, quantization="nf4"))
    assert isinstance(model, PeftModel) and model.training
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    perturb_lora(model, seed=2)
    model(input_ids=ids, labels=ids).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)

    # merged export goes onto the full-precision base: equal to fp32 base + the same adapter
    tok = load_tokenizer(tiny_dir)
    adapter_dir = export_policy(model, tok, tmp_path / "adapter", merge=False)
    merged_dir = export_policy(model, tok, tmp_path / "merged", merge=True)
    reference = load_model(ModelSpec(path=str(tiny_dir), adapter_path=str(adapter_dir)), for_training=False)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert getattr(merged.config, "quantization_config", None) is None
    want = logits(reference, ids)
    assert torch.allclose(logits(merged, ids), want, atol=1e-5 * float(want.abs().max()))


_EXPORTER = """
import sys
from pathlib import Path
from selfexplore.io import atomic_dir

out, tag = Path(sys.argv[1]), sys.argv[2]
for i in range(int(sys.argv[3])):
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_text(f"{tag}:{i}")
        (tmp / "config.json").write_text("{}")
"""


def test_two_writers_exporting_one_folder_never_fail_and_a_reader_always_finds_it(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "policy"
    writers = [subprocess.Popen([sys.executable, "-c", _EXPORTER, str(out), tag, "150"], stderr=subprocess.PIPE)
               for tag in ("a", "b")]
    polls = missed = 0
    seen = False
    while any(w.poll() is None for w in writers):
        polls += 1
        found = (out / "weights").is_file()
        missed += seen and not found  # once exported, the folder is always there, weights and all
        seen = seen or found
    errors = [w.stderr.read().decode() for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert missed == 0 and seen and polls > 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no temp or old folders left
    assert (out / "weights").read_text() in ("a:149", "b:149")
