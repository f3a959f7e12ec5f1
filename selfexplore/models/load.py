"""Load a causal LM as a `ModelSpec` describes it: full weights, LoRA, QLoRA (nf4) or base + adapter."""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

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


def load_model(spec: ModelSpec, for_training: bool = True) -> PreTrainedModel | PeftModel:
    """The model of `spec`, in train mode when `for_training`, else in eval mode with all grads off.

    Local folders are read with `local_files_only`; `trust_remote_code` is passed through as set.
    With `lora` the result is a fresh `PeftModel` whose only trainable weights are the adapter's;
    with `adapter_path` the saved adapter is loaded, trainable only when `for_training`.
    """
    source, local = resolve_source(spec.path)
    dtype = parse_dtype(spec.dtype)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "local_files_only": local}
    if spec.attn_implementation is not None:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.quantization == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    with explain_missing(source, local):
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)

    # peft (and the bitsandbytes it imports) only when the spec asks for an adapter or QLoRA.
    if for_training and spec.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if for_training and spec.gradient_checkpointing:
        _enable_checkpointing(model)

    if spec.adapter_path is not None:
        from peft import PeftModel

        adapter_source, adapter_local = resolve_source(spec.adapter_path)
        with explain_missing(adapter_source, adapter_local):
            model = PeftModel.from_pretrained(model, adapter_source, is_trainable=for_training)
    elif spec.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(spec.lora))

    if for_training:
        model.train()
    else:
        model.eval()
        model.requires_grad_(False)
    return model
