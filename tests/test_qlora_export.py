"""QLoRA (nf4 + LoRA) on CPU: LoRA gradients equal those of the same model with the nf4 weights dequantized
to fp32 (also after an eval-mode forward, which bitsandbytes would otherwise answer by repacking the weights
for a kernel with no autograd), and a trained policy exported merged greedy-decodes like the adapter model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from selfexplore.models import LoraSpec, ModelSpec, export_policy, load_model, load_tokenizer  # noqa: E402
from selfexplore.tasks import get_task  # noqa: E402

# fp32 compute: the nf4 path dequantizes and runs the same fp32 matmul as the dequantized copy, so the
# gradients agree to rounding (measured: 0.0); bf16 compute is ~1% apart, from bf16 itself.
GRAD_RTOL = 1e-5
# Relative error of one wrongly-computed gradient that the repacking bug gives (measured 0.60-1.07).
BUG_RTOL = 0.1


def _qlora(path: Path) -> PeftModel:
    """The recipes' QLoRA load in fp32 compute, with LoRA B nonzero so every A gets a gradient."""
    model = load_model(ModelSpec(path=str(path), quantization="nf4", lora=LoraSpec(r=8, alpha=16, dropout=0.0)))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def dequantized_copy(model: PeftModel, path: Path) -> PeftModel:
    """The same policy on fp32 weights: each nf4 weight dequantized, the same adapter on top."""
    plain = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
            weights[key] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    plain.load_state_dict(weights, strict=False)
    copy = get_peft_model(plain, model.peft_config["default"])
    set_peft_model_state_dict(copy, get_peft_model_state_dict(model))
    return copy.train()


def lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def worst_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).norm() / b[n].norm()) for n in a)


def _arith(count: int) -> tuple[list[str], list[str]]:
    task = get_task("arith", train_size=400, validation_size=50, test_size=50)
    problems = task.load("train")[:count]
    return [task.prompt(p) for p in problems], [p.solution for p in problems]


def _ids(tokenizer, texts: list[str]) -> torch.Tensor:
    return torch.tensor([tokenizer(t).input_ids for t in texts])


def test_lora_gradients_equal_the_dequantized_models_even_after_an_eval_forward(tiny_arith_model: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_arith_model))
    prompts, solutions = _arith(2)
    ids = _ids(tokenizer, [prompts[0] + solutions[0]])
    model = _qlora(tiny_arith_model)
    reference = lora_grads(dequantized_copy(model, tiny_arith_model), ids)
    assert worst_relative_error(lora_grads(model, ids), reference) < GRAD_RTOL
    model.eval()  # a validation / sanity check / reference pass: bitsandbytes may repack here
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False)
                   for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    assert worst_relative_error(lora_grads(model, ids), reference) < GRAD_RTOL


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking happens only on AVX512-BF16 CPUs")
def test_without_the_guard_an_eval_forward_makes_lora_gradients_wrong(tiny_arith_model: Path) -> None:
    """What `keep_nf4_layout_trainable` prevents: the bug is real on this CPU (so the test above means something)."""
    tokenizer = load_tokenizer(str(tiny_arith_model))
    prompts, solutions = _arith(1)
    ids = _ids(tokenizer, [prompts[0] + solutions[0]])
    model = _qlora(tiny_arith_model)
    reference = lora_grads(dequantized_copy(model, tiny_arith_model), ids)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' default
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    with pytest.warns(UserWarning, match="gemv_4bit: an autograd kernel was not registered"):
        grads = lora_grads(model, ids)
    assert worst_relative_error(grads, reference) > BUG_RTOL


# The merge goes onto the stored fp32 weights, the adapter trained on their nf4 approximation: the two
# policies differ by the quantization error W - dequant(nf4(W)), nothing else (checked to this bound).
MERGE_ATOL = 1e-5
NEW_TOKENS = 12
STEPS = 40


def greedy(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_a_trained_qlora_policy_exported_merged_decodes_like_the_adapter(tiny_arith_model: Path,
                                                                         tmp_path: Path) -> None:
    """A few steps of LoRA on nf4 memorise 4 arith rationales (so greedy margins are large, whatever the
    CPU); the merged export then writes the same greedy tokens on their prompts, and its weights are the
    stored ones plus the adapter's delta, i.e. the adapter's view plus exactly the nf4 error."""
    tokenizer = load_tokenizer(str(tiny_arith_model))
    prompts, solutions = _arith(4)
    torch.manual_seed(0)
    model = load_model(ModelSpec(path=str(tiny_arith_model), quantization="nf4",
                                 lora=LoraSpec(r=16, alpha=32, dropout=0.0)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    prompt_ids = [_ids(tokenizer, [p]) for p in prompts]
    # each prompt and the first NEW_TOKENS tokens of its rationale, the loss on those tokens only
    rows = [tokenizer(p + s).input_ids[:len(ids[0]) + NEW_TOKENS] for p, s, ids in zip(prompts, solutions, prompt_ids)]
    targets = [row[len(ids[0]):] for row, ids in zip(rows, prompt_ids)]
    for step in range(STEPS):
        for row, ids in zip(rows, prompt_ids):
            labels = torch.tensor([[-100] * len(ids[0]) + row[len(ids[0]):]])
            optimizer.zero_grad()
            model(input_ids=torch.tensor([row]), labels=labels).loss.backward()
            optimizer.step()
    model.eval()
    adapter_tokens = [greedy(model, ids) for ids in prompt_ids]
    assert adapter_tokens == targets  # memorised

    out = export_policy(model, tokenizer, tmp_path / "merged", merge=True)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert [greedy(merged, ids) for ids in prompt_ids] == adapter_tokens
    # not luck: on the decoded positions the two policies' logits differ by less than half the adapter's
    # smallest top-1 margin (measured: margins >= 0.61, logit differences <= 0.046)
    with torch.no_grad():
        for row, ids in zip(rows, prompt_ids):
            span = slice(len(ids[0]) - 1, len(row) - 1)
            adapter_logits = model(input_ids=torch.tensor([row])).logits[0, span]
            merged_logits = merged(input_ids=torch.tensor([row])).logits[0, span]
            top = adapter_logits.topk(2, -1).values
            assert float((adapter_logits - merged_logits).abs().max()) < float((top[:, 0] - top[:, 1]).min()) / 2

    stored = AutoModelForCausalLM.from_pretrained(str(tiny_arith_model), dtype=torch.float32).state_dict()
    merged_weights, seen = merged.state_dict(), []
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            key = name.replace("base_model.model.", "").replace(".base_layer", "") + ".weight"
            lora = model.get_submodule(name.rsplit(".", 1)[0])
            delta = lora.get_delta_weight("default").float()
            nf4 = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
            assert torch.allclose(merged_weights[key], stored[key] + delta, atol=MERGE_ATOL), key
            seen.append(float((stored[key] - nf4).abs().max() / stored[key].abs().max()))
    assert len(seen) == 2 * 7 and 0 < max(seen) < 0.2  # every linear layer; nf4's error is a few % of |W|max
