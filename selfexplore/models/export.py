"""Export a trained policy as a folder the next stage (HF or vLLM sampler, next round) can load."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from selfexplore.io import atomic_dir
from selfexplore.models.files import explain_missing, resolve_source
from selfexplore.models.tokenizer import save_tokenizer

if TYPE_CHECKING:
    from peft import PeftModel


def export_policy(model: PreTrainedModel | PeftModel, tokenizer: PreTrainedTokenizerBase,
                  out_dir: str | os.PathLike, merge: bool = True,
                  state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save `model` and `tokenizer` to `out_dir` atomically; returns `out_dir`.

    A plain model is saved as is. A `PeftModel` is saved either merged (`merge=True`: a plain
    HF folder, adapter folded into the weights) or as the adapter alone (`merge=False`:
    adapter_config.json records the base path the adapter was created on, as given then,
    so a relative base path stays relative to the working directory).
    The live model is never modified, so training can continue after an export.
    `state_dict` (the gathered full state of a sharded `model`, same keys) is saved in place of
    the model's own tensors, so a sharded policy needs no second full model to be exported.
    """
    if state_dict is not None:
        state_dict = _without_tied_copies(model, state_dict)
    with atomic_dir(out_dir) as tmp:
        if _is_peft(model) and merge:
            _merged_copy(model, state_dict).save_pretrained(tmp)
        else:
            model.save_pretrained(tmp, state_dict=state_dict)
        save_tokenizer(tokenizer, tmp)
    return Path(out_dir)


def _without_tied_copies(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gathered state without the second name of a tied parameter (lm_head.weight when the
    embeddings are tied): gathering gives each name its own tensor, so `save_pretrained` can no
    longer see that they are one and would save both, a checkpoint the base model does not have."""
    first: dict[int, str] = {}
    tied = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.add(name)
        first.setdefault(id(param), name)
    return {k: v for k, v in state_dict.items() if k not in tied}


def _is_peft(model: object) -> bool:
    """Whether `model` is a PeftModel, without importing peft (and bitsandbytes) for a plain model:
    a PeftModel exists only once peft was imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def _merged_copy(model: PeftModel, state_dict: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """The active adapter merged into a fresh full-precision load of its base checkpoint.

    Merging a copy instead of the live model keeps training state intact, costs CPU memory
    rather than accelerator memory, and is exact for QLoRA too: the adapter goes onto the
    base's stored weights (in their saved dtype), not onto their 4-bit approximation.
    """
    name = model.active_adapter
    base_path = model.peft_config[name].base_model_name_or_path
    if not base_path:
        raise ValueError("the adapter config records no base model path; export with merge=False")
    source, local = resolve_source(base_path)
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as adapter_dir:
        model.save_pretrained(adapter_dir, selected_adapters=[name], state_dict=state_dict)
        with explain_missing(source, local):
            base = AutoModelForCausalLM.from_pretrained(source, dtype="auto", local_files_only=local)
        saved = adapter_dir if name == "default" else os.path.join(adapter_dir, name)
        return PeftModel.from_pretrained(base, saved, adapter_name=name).merge_and_unload()
