"""Prompt format: the paper's raw `question\\n` prompt, or the tokenizer's chat template.

Every stage that turns a problem into model input (SFT data, RFT gold records, sampling,
evaluation) goes through `PromptFormat.prompter`; exploration and DPO read those prompts back
from the files the sample stage wrote, so train, sample, explore and eval always agree.

Rules in chat mode:
- The user message is the task's prompt, stripped; the system message is `system_prompt` when
  set, else whatever the template adds by default. The rendered text ends with the template's
  generation prompt (e.g. `<|im_start|>assistant\\n`) and the completion follows it directly.
- Prompts are encoded with the tokenizer's special tokens, as in raw mode. When the template
  already starts with the BOS text and the tokenizer also adds BOS on encode, the BOS text is
  dropped from the rendered prompt so the model never sees two.
- A completion ends with `completion_end_id(tokenizer)`: the template's end-of-turn token
  (SmolLM2: `<|im_end|>`) when the tokenizer has a template, else EOS. Training appends it and
  both samplers stop on it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from selfexplore.tasks.base import Problem, Task

_PROBE_USER, _PROBE_ANSWER = "2 + 2?", "ANSWER_END_PROBE"


@dataclass(frozen=True)
class PromptFormat:
    """How a task prompt becomes model input: raw (the paper, default) or the chat template.

    chat_template: wrap the prompt as one user turn with the tokenizer's chat template and its
        generation prompt (instruct models). Needs a tokenizer that has a template.
    system_prompt: a system message for chat mode (None: the template's default, if any).
    """

    chat_template: bool = False
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError("system_prompt needs chat_template=True (raw prompts have no system message)")

    def render(self, prompt: str, tokenizer: PreTrainedTokenizerBase | None) -> str:
        """The model input text for a task prompt."""
        if not self.chat_template:
            return prompt
        if tokenizer is None or not tokenizer.chat_template:
            name = getattr(tokenizer, "name_or_path", None) or "(none given)"
            raise ValueError(f"chat_template=True but the tokenizer {name} has no chat template; set "
                             "prompt_format.chat_template: false (raw 'question\\n' prompts) or use an "
                             "instruct model whose tokenizer defines one")
        messages = [{"role": "user", "content": prompt.strip()}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = tokenizer.bos_token
        if bos and text.startswith(bos) and _adds_bos(tokenizer):
            text = text[len(bos):]
        return text

    def prompter(self, task: Task, tokenizer: PreTrainedTokenizerBase | None = None) -> Callable[[Problem], str]:
        """problem -> model input text; checks the tokenizer once (chat mode needs one)."""
        if not self.chat_template:
            return task.prompt
        self.render("", tokenizer)
        return lambda problem: self.render(task.prompt(problem), tokenizer)


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether encoding a text puts BOS in front of it."""
    bos_id = tokenizer.bos_token_id
    return bos_id is not None and tokenizer("x").input_ids[:1] == [bos_id]


def completion_end_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a completion: the chat template's end-of-turn token, else EOS.

    Found by rendering a user turn and an assistant turn and taking the first token after the
    assistant's text, when that is a special token. A template that ends turns with plain
    text, or fails to render such a conversation, falls back to EOS (with a warning).
    """
    end = _template_end_id(tokenizer) if tokenizer.chat_template else None
    if end is not None:
        return end
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path or ''} has no EOS token and no chat template "
                         "end-of-turn token: completions cannot be ended")
    return tokenizer.eos_token_id


def _template_end_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    messages = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # noqa: BLE001 - jinja templates raise anything (raise_exception on role order)
        warnings.warn(f"the chat template of {tokenizer.name_or_path} cannot render a user/assistant turn "
                      f"({e}); completions end with EOS", stacklevel=3)
        return None
    tail = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER):] if _PROBE_ANSWER in text else ""
    ids = tokenizer(tail, add_special_tokens=False).input_ids if tail else []
    if ids and (ids[0] in tokenizer.all_special_ids
                or getattr(tokenizer.added_tokens_decoder.get(ids[0]), "special", False)):
        return ids[0]
    warnings.warn(f"the chat template of {tokenizer.name_or_path} ends an assistant turn without a special "
                  "token; completions end with EOS", stacklevel=3)
    return None
