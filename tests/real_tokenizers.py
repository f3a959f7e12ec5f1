"""Tiny tokenizers and models with the special-token conventions of the recipes' 7B models, built offline.

The recipes name Llemma-7B and DeepSeek-Math-7B (`LlamaForCausalLM`) and Mistral-7B
(`MistralForCausalLM`, sliding-window attention). A test that swaps them for the project's own
toy tokenizer (which has a pad token) never meets what a 7B run meets. The folders built here
copy the hub files' *shape* with a vocabulary of a few hundred pieces trained on the task text:

- `llama` (Llemma-7B, Mistral-7B): a SentencePiece-style BPE with byte fallback, the legacy
  `tokenizer.json` pipeline of those repositories (normalizer: prepend "▁", spaces -> "▁"),
  ids 0/1/2 = `<unk>` `<s>` `</s>`, BOS prepended, no EOS added, **no pad token**,
  `tokenizer_class: LlamaTokenizer`, `legacy: true`.
- `deepseek` (DeepSeek-Math-7B): a byte-level BPE (digits split) whose BOS/EOS are
  `<｜begin▁of▁sentence｜>` / `<｜end▁of▁sentence｜>` at the END of the vocabulary (not 0/1/2),
  BOS prepended, **no pad token**, `tokenizer_class: LlamaTokenizerFast`.

The model configs keep the real ones' architecture flags (untied embeddings, rope theta,
Mistral's sliding window, long `max_position_embeddings` so vLLM accepts the recipes'
`max_model_len: 4096`) at a hidden size of 64 with head_dim 32 (vLLM's CPU minimum).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

Convention = Literal["llama", "deepseek"]
Architecture = Literal["LlamaForCausalLM", "MistralForCausalLM"]

DEEPSEEK_BOS, DEEPSEEK_EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@dataclass(frozen=True)
class Family:
    """What a recipe's model is, for building its tiny stand-in."""

    architecture: Architecture
    convention: Convention
    rope_theta: float
    max_position_embeddings: int
    sliding_window: int | None = None


# The recipes' model names -> the real model's conventions (their hub config.json / tokenizer files).
FAMILIES: dict[str, Family] = {
    "llemma7b": Family("LlamaForCausalLM", "llama", rope_theta=1_000_000.0, max_position_embeddings=4096),
    "deepseekmath7b": Family("LlamaForCausalLM", "deepseek", rope_theta=10_000.0, max_position_embeddings=4096),
    # Mistral-7B-v0.1: sliding window 4096 over a 32k context; here 32 tokens, so the window is
    # really shorter than the sequences the tests train and sample on.
    "mistral7b": Family("MistralForCausalLM", "llama", rope_theta=10_000.0, max_position_embeddings=32768,
                        sliding_window=32),
}


def _llama_tokenizer_json(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """The legacy Llama/Mistral `tokenizer.json` pipeline, trained on `texts`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # SentencePiece pieces never span a word start: train on "▁"-split words (the saved file has no
    # pre-tokenizer, as the real one; merges alone then keep words apart).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    # Byte fallback pieces <0x00>..<0xFF> come right after the 3 specials, as in the real vocab.
    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials + byte_pieces, min_frequency=2,
                                  show_progress=False)
    # Line breaks stay out of the learned pieces: the real vocabularies encode "\n" as byte <0x0A>.
    tok.train_from_iterator((t.replace("\n", " ") for t in texts), trainer)
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _deepseek_tokenizer_json(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A DeepSeek-style byte-level BPE: digits split, its BOS/EOS added after the trained vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([DEEPSEEK_BOS, DEEPSEEK_EOS])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{DEEPSEEK_BOS} $A", pair=f"{DEEPSEEK_BOS} $A {DEEPSEEK_BOS} $B",
        special_tokens=[(DEEPSEEK_BOS, tok.token_to_id(DEEPSEEK_BOS))])
    return tok


def build_tokenizer(convention: Convention, texts: Iterable[str], out_dir: str | Path, vocab_size: int = 400) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` as the hub repos have them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(texts)
    if convention == "llama":
        tok = _llama_tokenizer_json(texts, vocab_size)
        bos, eos, unk = "<s>", "</s>", "<unk>"
        config = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "unk_token": unk,
                  "sp_model_kwargs": {}, "spaces_between_special_tokens": False}
        decoder_ids = {"0": unk, "1": bos, "2": eos}
    else:
        tok = _deepseek_tokenizer_json(texts, vocab_size)
        bos, eos, unk = DEEPSEEK_BOS, DEEPSEEK_EOS, None
        config = {"tokenizer_class": "LlamaTokenizerFast", "legacy": True, "unk_token": None}
        decoder_ids = {str(tok.token_to_id(bos)): bos, str(tok.token_to_id(eos)): eos}
    tok.save(str(out / "tokenizer.json"))
    config.update({
        "add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos, "pad_token": None,
        "clean_up_tokenization_spaces": False, "model_max_length": 16384,
        "added_tokens_decoder": {i: {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": True} for i, t in decoder_ids.items()},
    })
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": bos, "eos_token": eos, **({"unk_token": unk} if unk else {})}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return out


def build_family_model(family: Family | str, texts: Iterable[str], out_dir: str | Path, seed: int = 0,
                       hidden_size: int = 64, num_layers: int = 2) -> Path:
    """A tiny untrained model of `family`'s architecture with its tokenizer, as an HF folder (fp32 weights)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    family = FAMILIES[family] if isinstance(family, str) else family
    out = build_tokenizer(family.convention, texts, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    shape = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                 num_hidden_layers=num_layers, num_attention_heads=hidden_size // 32,
                 num_key_value_heads=hidden_size // 32,
                 head_dim=32, max_position_embeddings=family.max_position_embeddings, rope_theta=family.rope_theta,
                 rms_norm_eps=1e-5 if family.architecture == "MistralForCausalLM" else 1e-6,
                 tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                 pad_token_id=None, dtype="float32")
    if family.architecture == "MistralForCausalLM":
        config, cls = MistralConfig(**shape, sliding_window=family.sliding_window), MistralForCausalLM
    else:
        config, cls = LlamaConfig(**shape), LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    return out
