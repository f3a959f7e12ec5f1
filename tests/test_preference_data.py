"""PreferenceDataModule: boundary-safe tokenization, EOS, truncation, bad input, batching."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader, DistributedSampler

from selfexplore.data.preference import (
    LengthGroupedDistributedSampler,
    PreferenceDataModule,
    PreferenceDataset,
    truncate_pair,
)
from selfexplore.io import DataError

CORPUS = [
    "Tom has 12 apples and gets 7 more.\n12 + 7 = 19\nThe answer is 19\n",
    "Sam had 30 coins and lost 4.\n30 - 4 = 26\nThe answer is 26\n",
    "Ann reads 6 pages a day for 3 days.\n6 * 3 = 18\nThe answer is 18\n",
] * 20


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> str:
    """A byte-level BPE WITHOUT digit splitting, so merges like '19' cross a mid-number boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", clean_up_tokenization_spaces=False)
    out = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_path)


def _write(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _dm(tokenizer_path, train_path, **kw) -> PreferenceDataModule:
    dm = PreferenceDataModule(train_path=train_path, tokenizer_path=tokenizer_path, **kw)
    dm.setup("fit")
    return dm


BOUNDARY_RECORDS = [
    {"prompt": "Tom has 12 apples and gets 7 more.\n12 + 7 = 1", "chosen": "9\nThe answer is 19",
     "rejected": "8\nThe answer is 18", "meta": {"question_id": "q1", "pit_step": 2}},
    {"prompt": "Sam had 30 coins and lost 4.\n30 - 4 = 26\nThe ans", "chosen": "wer is 26",
     "rejected": "wer is 34", "meta": {"question_id": "q2"}},
]


def test_boundary_property_ids_and_mask(tmp_path, tokenizer_path, tok):
    for r in BOUNDARY_RECORDS:  # the test only bites if joint encoding differs from separate
        joint = tok(r["prompt"] + r["chosen"]).input_ids
        assert joint != tok(r["prompt"]).input_ids + tok(r["chosen"], add_special_tokens=False).input_ids
    dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", BOUNDARY_RECORDS), length_grouped=False)
    batch = dm.collate([dm.train_dataset[i] for i in range(2)])
    assert set(batch) == {"input_ids", "attention_mask", "loss_mask", "prompt_lengths", "index"}
    b = len(BOUNDARY_RECORDS)
    assert batch["input_ids"].shape[0] == 2 * b and batch["index"].tolist() == [0, 1]
    assert batch["loss_mask"].dtype == torch.bool
    for side, key in enumerate(("chosen", "rejected")):
        for i, r in enumerate(BOUNDARY_RECORDS):
            row = side * b + i
            prompt = tok(r["prompt"]).input_ids
            expected = prompt + tok(r[key], add_special_tokens=False).input_ids + [tok.eos_token_id]
            n = len(expected)
            assert prompt[0] == tok.bos_token_id
            assert batch["input_ids"][row, :n].tolist() == expected
            assert batch["input_ids"][row, n:].eq(tok.pad_token_id).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
            assert batch["loss_mask"][row].nonzero().flatten().tolist() == list(range(len(prompt), n))
            assert batch["prompt_lengths"][row].item() == len(prompt)


def test_eos_can_be_disabled(tmp_path, tokenizer_path, tok):
    dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", BOUNDARY_RECORDS), eos=False)
    item = dm.train_dataset[0]
    assert item["chosen_ids"] == tok("9\nThe answer is 19", add_special_tokens=False).input_ids
    assert item["rejected_ids"] == tok("8\nThe answer is 18", add_special_tokens=False).input_ids


def test_a_side_that_does_not_end_the_response_gets_no_end_token(tmp_path, tokenizer_path, tok):
    """A granular pair's pit step is followed by more steps: no EOS on it, EOS on the whole chosen."""
    records = [{"prompt": "Tom has 12 apples and gets 7 more.\n", "chosen": "12 + 7 = 19\nThe answer is 19",
                "rejected": "12 + 7 = 18", "rejected_ends": False},
               {**BOUNDARY_RECORDS[0], "chosen_ends": False, "rejected_ends": True}]
    dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", records), length_grouped=False)
    step, flipped = dm.train_dataset[0], dm.train_dataset[1]
    assert step["rejected_ids"] == tok("12 + 7 = 18", add_special_tokens=False).input_ids
    assert step["chosen_ids"] == tok("12 + 7 = 19\nThe answer is 19", add_special_tokens=False).input_ids + [
        tok.eos_token_id]
    assert flipped["chosen_ids"][-1] != tok.eos_token_id and flipped["rejected_ids"][-1] == tok.eos_token_id


def test_truncate_pair_rules():
    bos, prompt = 1, [1, 10, 11, 12, 13, 14, 15]  # BOS + 6 tokens
    chosen, rejected = [20, 21, 22], [30, 31, 32, 33, 34]
    # fits: untouched, even though the prompt is longer than max_prompt_length
    assert truncate_pair(prompt, chosen, rejected, 12, 4, keep_prefix=1) == (prompt, chosen, rejected, False, False)
    # too long: prompt left-truncated to 4 keeping BOS and its END; completions then fit (4 + 5 <= 10)
    p, c, r, p_cut, c_cut = truncate_pair(prompt, chosen, rejected, 10, 4, keep_prefix=1)
    assert (p, c, r, p_cut, c_cut) == ([bos, 13, 14, 15], chosen, rejected, True, False)
    # still too long after the prompt cut: both completions lose their ends
    p, c, r, p_cut, c_cut = truncate_pair(prompt, chosen, rejected, 7, 4, keep_prefix=1)
    assert (p, c, r, p_cut, c_cut) == ([bos, 13, 14, 15], [20, 21, 22], [30, 31, 32], True, True)
    # short prompt, long completions: only the completions are cut
    p, c, r, p_cut, c_cut = truncate_pair([1, 10], chosen, rejected, 5, 4, keep_prefix=1)
    assert (p, c, r, p_cut, c_cut) == ([1, 10], [20, 21, 22], [30, 31, 32], False, True)


def test_truncation_in_module_and_counts(tmp_path, tokenizer_path, tok):
    long_prompt = "Tom has 12 apples and gets 7 more.\n" * 6 + "12 + 7 = 1"
    records = [BOUNDARY_RECORDS[0],
               {"prompt": long_prompt, "chosen": "9\nThe answer is 19", "rejected": "8\nThe answer is 18"},
               {"prompt": "Sam had", "chosen": " 30 coins.\n" * 30, "rejected": " 31 coins.\n" * 30}]
    dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", records), max_length=48, max_prompt_length=20)
    assert dm.stats["train"] == {"records": 3, "used": 3, "skipped_invalid": 0,
                                 "skipped_identical_after_truncation": 0, "prompt_truncated": 1,
                                 "completion_truncated": 1}
    full_prompt = tok(long_prompt).input_ids
    item = dm.train_dataset[1]
    assert len(item["prompt_ids"]) == 20
    assert item["prompt_ids"] == [tok.bos_token_id] + full_prompt[-19:]  # BOS kept, end kept
    assert item["chosen_ids"][-1] == tok.eos_token_id
    item = dm.train_dataset[2]
    budget = 48 - len(item["prompt_ids"])
    assert len(item["chosen_ids"]) == len(item["rejected_ids"]) == budget
    assert item["chosen_ids"] == tok(" 30 coins.\n" * 30, add_special_tokens=False).input_ids[:budget]
    assert max(dm.train_dataset.lengths) <= 48


def test_pairs_identical_after_truncation_are_skipped_and_counted(tmp_path, tokenizer_path):
    same_start = " 30 coins.\n" * 30
    records = [BOUNDARY_RECORDS[0], {"prompt": "Sam had", "chosen": same_start + "A", "rejected": same_start + "B"}]
    with pytest.warns(UserWarning, match="identical after truncation"):
        dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", records), max_length=32, max_prompt_length=16)
    assert dm.stats["train"]["skipped_identical_after_truncation"] == 1
    assert len(dm.train_dataset) == 1


@pytest.mark.parametrize("bad_line, line_field, message", [
    ({"prompt": "Q\n", "chosen": "", "rejected": "x"}, "chosen", "empty value"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt", "empty value"),
    ({"prompt": "Q\n", "chosen": "a"}, "rejected", "missing field"),
    ({"prompt": "Q\n", "chosen": 3, "rejected": "b"}, "chosen", "expected a string"),
    ({"prompt": "Q\n", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
    ({"prompt": "Q\n", "chosen": "a", "rejected": "b", "rejected_ends": "no"}, "rejected_ends", "true or false"),
    ('{"prompt": "Q", "chosen": ', None, "not valid JSON"),
    ('["prompt", "chosen"]', None, "expected a JSON object"),
])
def test_bad_input_names_file_line_and_field(tmp_path, tokenizer_path, bad_line, line_field, message):
    path = _write(tmp_path / "bad.jsonl", [BOUNDARY_RECORDS[0], "", bad_line, BOUNDARY_RECORDS[1]])
    with pytest.raises(DataError, match=message) as err:
        _dm(tokenizer_path, path)
    assert err.value.path is not None and str(err.value.path).endswith("bad.jsonl")
    assert err.value.line == 3 and err.value.field == line_field
    assert "bad.jsonl" in str(err.value) and "line 3" in str(err.value)


def test_non_utf8_and_missing_file(tmp_path, tokenizer_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(json.dumps(BOUNDARY_RECORDS[0]).encode() + b"\n\xff\xfe\x00garbage\n")
    with pytest.raises(DataError, match="not UTF-8") as err:
        _dm(tokenizer_path, str(path))
    assert err.value.line == 2
    with pytest.raises(DataError, match="file not found"):
        _dm(tokenizer_path, str(tmp_path / "missing.jsonl"))


def test_skip_mode_counts_and_zero_usable_is_an_error(tmp_path, tokenizer_path):
    records = [BOUNDARY_RECORDS[0], "not json", {"prompt": "Q", "chosen": "a", "rejected": "a"},
               {"prompt": "Q", "chosen": ""}, BOUNDARY_RECORDS[1]]
    with pytest.warns(UserWarning, match="skipped 3 invalid"):
        dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", records), on_invalid="skip")
    assert dm.stats["train"]["records"] == 5 and dm.stats["train"]["skipped_invalid"] == 3
    assert dm.stats["train"]["used"] == len(dm.train_dataset) == 2
    assert [dm.train_dataset[i]["index"] for i in range(2)] == [0, 1]
    only_bad = _write(tmp_path / "bad.jsonl", records[1:4])
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no usable preference pairs") as err:
        _dm(tokenizer_path, only_bad, on_invalid="skip")
    assert str(err.value.path).endswith("bad.jsonl")
    with pytest.raises(DataError, match="no usable"):
        _dm(tokenizer_path, _write(tmp_path / "empty.jsonl", []))


def test_invalid_settings(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="max_prompt_length"):
        PreferenceDataModule(train_path="x", tokenizer_path=tokenizer_path, max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="on_invalid"):
        PreferenceDataModule(train_path="x", tokenizer_path=tokenizer_path, on_invalid="ignore")


def test_dataset_fingerprint_tracks_data(tmp_path, tok):
    a = PreferenceDataset.from_jsonl(_write(tmp_path / "a.jsonl", BOUNDARY_RECORDS), tok)
    b = PreferenceDataset.from_jsonl(_write(tmp_path / "b.jsonl", BOUNDARY_RECORDS), tok)
    c = PreferenceDataset.from_jsonl(_write(tmp_path / "c.jsonl", BOUNDARY_RECORDS[::-1]), tok)
    d = PreferenceDataset.from_jsonl(_write(tmp_path / "d.jsonl", BOUNDARY_RECORDS), tok, eos=False)
    assert a.fingerprint() == b.fingerprint()
    assert len({a.fingerprint(), c.fingerprint(), d.fingerprint()}) == 3


# ----- length-grouped batching -------------------------------------------------------------------

LENGTHS = [3, 50, 7, 48, 5, 46, 9, 44, 2, 47, 8, 45, 4, 49]  # 14 items: short and long ones


def _batches(sampler, batch_size):
    return [b.tolist() for b in DataLoader(list(range(len(sampler.lengths))), batch_size=batch_size, sampler=sampler)]


def test_length_grouped_batches_are_homogeneous_and_cover_everything():
    sampler = LengthGroupedDistributedSampler(LENGTHS, batch_size=4, seed=3)
    assert isinstance(sampler, DistributedSampler)  # Lightning keeps it under DDP
    batches = _batches(sampler, 4)
    assert sorted(i for b in batches for i in b) == list(range(14)) and len(sampler) == 14
    assert [len(b) for b in batches] == [4, 4, 4, 2]  # the short batch comes last
    ranked = sorted(range(14), key=lambda i: -LENGTHS[i])  # one mega-chunk: batches are sorted slices
    assert sorted(map(sorted, batches)) == sorted(sorted(ranked[k:k + 4]) for k in range(0, 14, 4))
    assert _batches(sampler, 4) == batches  # deterministic per seed and epoch
    epochs = set()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        epochs.add(tuple(map(tuple, _batches(sampler, 4))))
    assert len(epochs) > 1  # reshuffled across epochs


def test_length_grouped_sampler_shards_whole_batches_per_rank():
    ranks = [LengthGroupedDistributedSampler(LENGTHS, batch_size=4, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    per_rank = [_batches(s, 4) for s in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 4 batches -> 2 each; equal counts avoid DDP hangs
    assert [len(s) for s in ranks] == [sum(map(len, b)) for b in per_rank]
    seen = [i for b in per_rank for batch in b for i in batch]
    assert sorted(seen) == list(range(14))
    whole = {tuple(sorted(b)) for b in _batches(LengthGroupedDistributedSampler(LENGTHS, 4, seed=1), 4)}
    assert {tuple(sorted(b)) for b in per_rank[0] + per_rank[1]} == whole
    # 18 items = 4 full batches + 1 short over 2 ranks: one full batch repeats so both take 3
    ranks = [LengthGroupedDistributedSampler(LENGTHS + [6, 51, 10, 12], 4, num_replicas=2, rank=r) for r in (0, 1)]
    per_rank = [_batches(s, 4) for s in ranks]
    assert [len(b) for b in per_rank] == [3, 3] and [len(s) for s in ranks] == [sum(map(len, b)) for b in per_rank]
    assert sorted({i for b in per_rank for batch in b for i in batch}) == list(range(18))
    assert [len(batch) for b in per_rank for batch in b].count(2) == 1  # the short one, last of its rank
    assert any(len(b[-1]) == 2 for b in per_rank)


def test_datamodule_uses_trainer_data_parallel_rank(tmp_path, tokenizer_path):
    dm = _dm(tokenizer_path, _write(tmp_path / "pairs.jsonl", BOUNDARY_RECORDS * 3), batch_size=2)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": 1}))
    sampler = dm.train_dataloader().sampler
    assert isinstance(sampler, LengthGroupedDistributedSampler)
    assert (sampler.num_replicas, sampler.rank, len(sampler)) == (2, 1, 4)  # 3 batches padded to 4


class _Recorder(LightningModule):
    """Consumes preference batches like a DPO module would; records what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.seen: list[tuple[int, ...]] = []
        self.val_batches = 0

    def training_step(self, batch, batch_idx):
        assert batch["input_ids"].shape[0] == 2 * batch["index"].shape[0]
        self.seen.append(tuple(batch["index"].tolist()))
        return self.w * batch["loss_mask"].float().mean()

    def validation_step(self, batch, batch_idx):
        self.val_batches += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("with_val", [False, True])
def test_fit_with_lightning_trainer(tmp_path, tokenizer_path, with_val):
    path = _write(tmp_path / "pairs.jsonl", BOUNDARY_RECORDS * 3)
    dm = PreferenceDataModule(train_path=path, val_path=path if with_val else None, tokenizer_path=tokenizer_path,
                              batch_size=4)
    module = _Recorder()
    trainer = Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert len(module.seen) == 4  # 6 pairs, batch 4 -> 2 batches per epoch
    for epoch in (module.seen[:2], module.seen[2:]):
        assert sorted(i for b in epoch for i in b) == list(range(6))
    assert module.val_batches == (4 if with_val else 0)
    assert dm.stats["train"]["used"] == 6 and ("val" in dm.stats) == with_val
