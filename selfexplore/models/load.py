"""Load a causal LM as a `ModelSpec` describes it: full weights, LoRA, QLoRA (nf4) or base + adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig, PreTrainedModel

from selfexplore.models.files import explain_missing, resolve_source
from selfexplore.models.spec import LoraSpec, ModelSpec, parse_dtype

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# Non-reentrant checkpointing works with frozen inputs (LoRA) without enable_input_require_grads.
_CHECKPOINTING = {"use_reentrant": False}


def _lora_config(spec: LoraSpec) -> LoraConfig:
    """The peft config for a new causal-LM adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=spec.target_modules,
        bias=spec.bias, modules_to_save=spec.modules_to_save, task_type="CAUSAL_LM")


def _enable_checkpointing(model: PreTrainedModel) -> None:
    """Activation checkpointing under its transformers 5 name, or the 4.x one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=_CHECKPOINTING)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)


def _load_kwargs(spec: ModelSpec) -> dict:
    """What `from_pretrained` and `from_config` share: dtype, remote code, attention kernel."""
    kwargs: dict = {"dtype": parse_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    return kwargs


def load_model(spec: ModelSpec, for_training: bool = True) -> PreTrainedModel | PeftModel:
    """The model of `spec`, in train mode when `for_training`, else in eval mode with all grads off.

    Local folders are read with `local_files_only`; `trust_remote_code` is passed through as set.
    With `lora` the result is a fresh `PeftModel` whose only trainable weights are the adapter's;
    with `adapter_path` the saved adapter is loaded, trainable only when `for_training`.
    """
    source, local = resolve_source(spec.path)
    kwargs = {**_load_kwargs(spec), "local_files_only": local}
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"])
    with explain_missing(source, local):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)

    # peft (and the bitsandbytes it imports) only when the spec asks for an adapter or QLoRA.
    if for_training and spec.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        keep_nf4_layout_trainable(model)
    if spec.adapter_path is None:
        return _finish(model, spec, for_training, spec.lora)

    def saved_adapter(base: PreTrainedModel) -> PeftModel:
        from peft import PeftModel

        adapter_source, adapter_local = resolve_source(spec.adapter_path)
        with explain_missing(adapter_source, adapter_local):
            return PeftModel.from_pretrained(base, adapter_source, is_trainable=for_training)
    return _finish(model, spec, for_training, saved_adapter)


def build_model_skeleton(spec: ModelSpec, for_training: bool = True) -> PreTrainedModel | PeftModel:
    """`load_model`'s model on the meta device: the same modules, parameter names and flags, no weights.

    For the FSDP2 ranks that do not read the checkpoint: they shard this skeleton and receive
    their shards from rank 0 (`selfexplore.training.sharding.load_sharded`), so only one process
    per fit ever holds the full weights. Non-persistent buffers (rotary tables) are meta too and
    must be copied in as well. No 4-bit variant: QLoRA trains on one GPU.
    """
    if spec.quantization is not None:
        raise ValueError("a quantized (QLoRA) model cannot be built on the meta device for FSDP; train it on one GPU")
    source, local = resolve_source(spec.path)
    with explain_missing(source, local):
        config = AutoConfig.from_pretrained(source, trust_remote_code=spec.trust_remote_code, local_files_only=local)
    adapter: LoraSpec | LoraConfig | None = spec.lora
    if spec.adapter_path is not None:  # the saved adapter's shape; its weights come from rank 0
        from peft import LoraConfig

        adapter_source, adapter_local = resolve_source(spec.adapter_path)
        with explain_missing(adapter_source, adapter_local):
            adapter = LoraConfig.from_pretrained(adapter_source, local_files_only=adapter_local)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **_load_kwargs(spec))
        try:  # generation settings (EOS ids) must match rank 0's, or ranks stop generating at different steps
            model.generation_config = GenerationConfig.from_pretrained(source, local_files_only=local)
        except OSError:  # no generation_config.json: from_pretrained derives it from the config, as from_config did
            pass
        return _finish(model, spec, for_training, adapter)


def keep_nf4_layout_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking a trained model's nf4 weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first eval-mode forward without gradients (a validation, a
    sanity check, a reference pass) converts each `Linear4bit` weight in place to a packed layout
    that only `gemv_4bit` reads, and it stays so back in train mode: `gemv_4bit` has no autograd
    kernel, so the backward drops the base weights' path ("may lead to silently incorrect
    behavior") and LoRA gradients come out wrong (measured: 60-107% relative error, docs/gpu.md).
    CUDA never takes this path; on CPU the unpacked layout is the dequantize + matmul one.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _finish(model: PreTrainedModel, spec: ModelSpec, for_training: bool,
            adapter: LoraSpec | LoraConfig | Callable[[PreTrainedModel], PeftModel] | None
            ) -> PreTrainedModel | PeftModel:
    """Checkpointing, then the adapter (a new one from a spec or config, or a loader), then train/eval mode."""
    if for_training and spec.gradient_checkpointing:
        _enable_checkpointing(model)
    if callable(adapter):
        model = adapter(model)
    elif adapter is not None:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(adapter) if isinstance(adapter, LoraSpec) else adapter)
    if for_training:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model
