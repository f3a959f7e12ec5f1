"""Tokenizers: training a tiny digit-splitting BPE and saving one (loading, with its pad-token
fallback: `selfexplore.models.files.load_tokenizer`).

Conventions every stage relies on:
- Padding side is left at the tokenizer's default (right for the tokenizers built here).
  Callers that batch prompts for generation set `tokenizer.padding_side = "left"` themselves.
- The tokenizers built here add BOS (`<s>`) at the start of every encode, like Llama, and never
  add EOS. To concatenate a prompt and a completion, encode the prompt normally and the
  completion with `add_special_tokens=False`, then append `eos_token_id` explicitly if wanted.
- Decoding with `skip_special_tokens=True` returns exactly the encoded text (byte-level BPE,
  `clean_up_tokenization_spaces=False`): newlines, tabs and repeated spaces survive.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from selfexplore.io import read_json, write_json

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                        model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE whose digits are always single tokens (tiny models learn carrying).

    Digits are split off before the byte-level regex, so no merge can ever join two digits or a
    digit with a letter; byte-level symbols make any text (unseen characters too) round-trip.
    """
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    extra = {} if model_max_length is None else {"model_max_length": model_max_length}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, **extra)


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> None:
    """`save_pretrained`, written so that transformers 4.x (and tools pinned to it) can read it too.

    transformers 5 records the generic fast tokenizer as `TokenizersBackend`, a class 4.x lacks;
    `PreTrainedTokenizerFast` names the same thing for both (it keeps tokenizer.json's post-processor).
    """
    tokenizer.save_pretrained(out_dir)
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = read_json(config_path)
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(config_path, config)
