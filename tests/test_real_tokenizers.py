"""The recipes' tokenizer conventions (Llama/Mistral SentencePiece-style, DeepSeek-Math byte-level), met
as a 7B run meets them: no pad token, BOS prepended, the model's own EOS closing a chosen/rejected step,
and a completion encoded on its own carrying no spurious word-boundary space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from real_tokenizers import DEEPSEEK_BOS, DEEPSEEK_EOS, FAMILIES, build_tokenizer

from selfexplore.data.batching import encode_prompt_completion, inserts_prefix_space
from selfexplore.data.preference import PreferenceDataset
from selfexplore.models import load_tokenizer

TEXTS = [f"Tom has {i} apples and buys {i + 2} more. How many apples does he have?\n"
         f"He has {i} + {i + 2} = {2 * i + 2} apples.\nThe answer is {2 * i + 2}" for i in range(40)]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    name = request.param
    return name, build_tokenizer(FAMILIES[name].convention, TEXTS, tmp_path_factory.mktemp(name))


def test_conventions_are_the_real_models(family_tokenizer: tuple[str, Path]) -> None:
    name, path = family_tokenizer
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["pad_token"] is None and config["add_bos_token"] and not config["add_eos_token"]
    with pytest.warns(UserWarning, match="no pad token"):
        tokenizer = load_tokenizer(path)
    bos, eos = ("<s>", "</s>") if FAMILIES[name].convention == "llama" else (DEEPSEEK_BOS, DEEPSEEK_EOS)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (bos, eos, eos)  # pad = EOS
    if FAMILIES[name].convention == "llama":
        assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
        assert inserts_prefix_space(tokenizer)  # the legacy Prepend("▁") normalizer, as Llama-2 / Mistral
    else:
        assert tokenizer.bos_token_id >= len(tokenizer) - 2  # its own ids, after the vocabulary
        assert not inserts_prefix_space(tokenizer)
    ids = tokenizer("He has 3").input_ids
    assert ids[0] == tokenizer.bos_token_id and ids[-1] != tokenizer.eos_token_id


def test_a_step_pair_encodes_as_the_sampler_saw_it(family_tokenizer: tuple[str, Path], tmp_path: Path) -> None:
    """prompt ids + completion ids == the ids of the joined text (+ EOS): no spurious "▁" at the seam,
    which a SentencePiece tokenizer would put before a completion encoded on its own."""
    _, path = family_tokenizer
    tokenizer = load_tokenizer(path)
    prompt, step = "Tom has 3 apples and buys 5 more.\nHe has 3 + 5 = 8 apples.\n", "The answer is 8"
    prompt_ids, completion_ids = encode_prompt_completion(tokenizer, prompt, step, tokenizer.eos_token_id)
    assert prompt_ids + completion_ids == tokenizer(prompt + step).input_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(completion_ids, skip_special_tokens=True) == step

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": prompt, "chosen": step, "rejected": "The answer is 9",
                                 "rejected_ends": False}) + "\n")
    example = PreferenceDataset.from_jsonl(pairs, tokenizer, max_length=96, max_prompt_length=64)[0]
    assert example["chosen_ids"][-1] == tokenizer.eos_token_id  # a side that ends the response ends with EOS
    assert example["rejected_ids"][-1] != tokenizer.eos_token_id
    assert example["prompt_ids"][0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in example["chosen_ids"]
