"""The step tag: one added token after each step, where a verifier reads the step's score.

Peers' known failures are refused here, not worked around: a separator that merges with the text
around it (labels vanish), tags silently cut by truncation, labels of the wrong type. So:
- the tag is one added special token, never a piece of text; a prompt or step whose own text
  encodes to it is an error;
- each step is tokenized on its own and the ids concatenated (as `selfexplore.data.preference`
  does for prompt and completion), so BPE cannot merge a step with its neighbour or the tag, and
  training and scoring share `encode_steps`, so both see the same ids;
- `encode_steps` asserts one tag per step; a row longer than the length limit is never cut (the
  data module counts and skips or refuses it).
This is TRL's `PRMTrainer` tokenization with `step_separator` set to the tag (the label on the
separator's last token, which is the tag itself).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

STEP_TAG = "<|step|>"
GOOD, BAD = "+", "-"  # the vocabulary tokens whose logit difference at a tag is the step's score


def add_step_tag(tokenizer) -> int:
    """Add the step tag to `tokenizer` (a no-op when present); returns its id."""
    if STEP_TAG not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [STEP_TAG]})
    return tag_id(tokenizer)


def tag_id(tokenizer) -> int:
    """The step tag's id; ValueError for a tokenizer without it (see `prepare_verifier_base`)."""
    vocab = tokenizer.get_vocab()
    if STEP_TAG not in vocab:
        raise ValueError(f"the tokenizer has no step tag {STEP_TAG!r}: build the verifier's base with "
                         "selfexplore.prm.tagging.prepare_verifier_base(policy, out_dir)")
    return vocab[STEP_TAG]


def score_ids(tokenizer) -> tuple[int, int]:
    """Ids of the GOOD and BAD tokens (each must be one token of the vocabulary)."""
    ids = [tokenizer(piece, add_special_tokens=False).input_ids for piece in (GOOD, BAD)]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"{GOOD!r} and {BAD!r} must each be one token of the verifier's vocabulary, got {ids}")
    return ids[0][0], ids[1][0]


def prepare_verifier_base(source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """A copy of the HF model folder `source` with the step tag added to its tokenizer and embeddings.

    Done once, before any verifier fit, so every strategy (FSDP2 shards the model as it is built),
    LoRA and QLoRA load a model that already knows the tag; its embedding starts at the mean of
    the others (transformers' default for new rows).
    """
    from transformers import AutoModelForCausalLM

    from selfexplore.models import load_tokenizer
    from selfexplore.models.tokenizer import save_tokenizer

    tokenizer = load_tokenizer(str(source))
    add_step_tag(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(str(source))
    model.resize_token_embeddings(len(tokenizer))
    out = Path(out_dir)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    return out


class TagError(ValueError):
    """A row whose text would put a tag where no step ends (its text encodes to the tag)."""


def encode_steps(tokenizer, prompt: str, steps: Sequence[str], tag: int) -> tuple[list[int], list[int]]:
    """(ids, tag positions) of a row: the prompt with the tokenizer's special prefix (BOS), then each
    step's own ids followed by the tag. Exactly one position per step, in order."""
    ids = list(tokenizer(prompt).input_ids)
    if tag in ids:
        raise TagError(f"the prompt's text holds the step tag {STEP_TAG!r}")
    positions = []
    for i, step in enumerate(steps):
        step_ids = list(tokenizer(step, add_special_tokens=False).input_ids)
        if tag in step_ids:
            raise TagError(f"step {i + 1}'s text holds the step tag {STEP_TAG!r}")
        ids.extend(step_ids)
        ids.append(tag)
        positions.append(len(ids) - 1)
    assert len(positions) == len(steps) and all(ids[p] == tag for p in positions)
    return ids, positions
