"""Step tags, TRL-equivalent tokenization, verifier metrics, and a verifier learning a separable toy labelling."""

from __future__ import annotations

from itertools import chain

import pytest
import torch

from selfexplore.io import DataError, write_jsonl
from selfexplore.prm.metrics import FirstErrorMetrics, StepMetrics, first_flagged
from selfexplore.prm.tagging import STEP_TAG, encode_steps, prepare_verifier_base, tag_id
from selfexplore.prm.verifier import PRMDataModule, StepLabelCollator, StepLabelDataset


@pytest.fixture(scope="module")
def verifier_base(tiny_arith_model, tmp_path_factory):
    return prepare_verifier_base(tiny_arith_model, tmp_path_factory.mktemp("verifier") / "base")


@pytest.fixture(scope="module")
def tokenizer(verifier_base):
    from selfexplore.models import load_tokenizer

    return load_tokenizer(str(verifier_base))


def trl_tokenize_row(tokenizer, prompt, completions, labels, step_separator, train_on_last_step_only=False):
    """trl.experimental.prm.PRMTrainer.tokenize_row (no truncation), written out: the reference."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completions_ids = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
    if train_on_last_step_only:
        labels = [-100] * (len(labels) - 1) + [int(labels[-1])]
    else:
        labels = [int(x) for x in labels]
    separator_ids = tokenizer.encode(step_separator, add_special_tokens=False)
    completions_ids = [c + separator_ids for c in completions_ids]
    labels = [[-100] * (len(c) - 1) + [x] for c, x in zip(completions_ids, labels)]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id] + prompt_ids
    return prompt_ids + list(chain(*completions_ids)), [-100] * len(prompt_ids) + list(chain(*labels))


ROW = {"prompt": "Ava has 23 marbles. How many?\n", "completions": ["Ava starts with 23 marbles.", "23 + 17 = 40",
                                                                     "The answer is 40"],
       "labels": [True, True, False]}


@pytest.mark.parametrize("mode", ["process", "outcome"])
def test_each_label_sits_on_its_tag_as_trl_puts_it(tokenizer, tmp_path, mode) -> None:
    write_jsonl(tmp_path / "prm.jsonl", [ROW])
    item = StepLabelDataset.from_jsonl(tmp_path / "prm.jsonl", tokenizer, labels=mode)[0]
    ids, trl_labels = trl_tokenize_row(tokenizer, ROW["prompt"], ROW["completions"], ROW["labels"], STEP_TAG,
                                       train_on_last_step_only=mode == "outcome")
    assert item["ids"] == ids
    batch = StepLabelCollator(0)([item])
    tag = tag_id(tokenizer)
    assert batch["tag_mask"][0].tolist() == [i == tag for i in ids]
    read = batch["train_mask"][0]
    assert [int(x) for x in batch["targets"][0][read].tolist()] == [x for x in trl_labels if x != -100]
    assert read.nonzero().squeeze(-1).tolist() == [i for i, x in enumerate(trl_labels) if x != -100]
    # each tag follows its step's own ids: the text before tag t decodes to steps 1..t
    positions = item["positions"]
    for t, p in enumerate(positions):
        text = tokenizer.decode(ids[positions[t - 1] + 1 if t else 0:p], skip_special_tokens=True)
        assert text.endswith(ROW["completions"][t])


def test_tags_are_never_cut_or_faked(tokenizer, tmp_path) -> None:
    long_row = {**ROW, "completions": ["1 + 1 = 2"] * 60, "labels": [True] * 60}
    write_jsonl(tmp_path / "prm.jsonl", [ROW, long_row])
    data = StepLabelDataset.from_jsonl(tmp_path / "prm.jsonl", tokenizer, max_length=64)
    assert (data.stats["used"], data.stats["skipped_overlong"]) == (1, 1)
    with pytest.raises(DataError, match="line 2.*over max_length=64"):
        StepLabelDataset.from_jsonl(tmp_path / "prm.jsonl", tokenizer, max_length=64, overlong="error")
    write_jsonl(tmp_path / "bad.jsonl", [{**ROW, "completions": [f"a {STEP_TAG} b", "c", "d"]}])
    with pytest.raises(DataError, match="field 'completions'.*step 1's text holds the step tag"):
        StepLabelDataset.from_jsonl(tmp_path / "bad.jsonl", tokenizer)
    for labels, why in (([1, 1, 0], "true/false"), ([True, False], "2 labels for 3 steps"),
                        ([0.9, 0.5, 0.1], "true/false")):
        write_jsonl(tmp_path / "bad.jsonl", [{**ROW, "labels": labels}])
        with pytest.raises(DataError, match=f"line 1, field 'labels'.*{why}"):
            StepLabelDataset.from_jsonl(tmp_path / "bad.jsonl", tokenizer)
    ids, positions = encode_steps(tokenizer, ROW["prompt"], ROW["completions"], tag_id(tokenizer))
    assert len(positions) == 3 and all(ids[p] == tag_id(tokenizer) for p in positions)


def test_metrics_on_known_scores() -> None:
    steps = StepMetrics(threshold=0.5)
    steps.update(torch.tensor([0.9, 0.8, 0.2, 0.7, 0.6, 0.4]), torch.tensor([1, 1, 0, 1, 1, 1]))
    out = steps.compute()
    assert out["auroc"] == pytest.approx(1.0)
    assert out["balanced_accuracy"] == pytest.approx((4 / 5 + 1) / 2)  # one good step flagged
    assert out["negative_f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    first = FirstErrorMetrics(threshold=0.5)
    rows = [([0.9, 0.2], [True, False]), ([0.3, 0.9, 0.1], [True, True, False]), ([0.9, 0.9], [True, True]),
            ([0.9, 0.1], [True, True])]
    first.update([torch.tensor(s) for s, _ in rows], [torch.tensor(x) for _, x in rows])
    out = first.compute()
    assert (float(out["acc_err"]), float(out["acc_cor"]), float(out["f1"])) == (0.5, 0.5, 0.5)
    assert first_flagged([0.9, 0.9], 0.5) == -1


def toy_rows(n: int, seed: int) -> list[dict]:
    """A step is bad exactly when it says 'wrong': rows of good steps, some ending at a bad one."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(1, 4, (1,), generator=g))
        steps = [f"{int(torch.randint(10, 99, (1,), generator=g))} is right" for _ in range(length)]
        labels = [True] * length
        if torch.rand(1, generator=g) < 0.5:
            steps[-1], labels[-1] = f"{int(torch.randint(10, 99, (1,), generator=g))} is wrong", False
        rows.append({"prompt": "Check the numbers.\n", "completions": steps, "labels": labels})
    return rows


def test_verifier_learns_a_separable_toy_labelling(verifier_base, tmp_path) -> None:
    from lightning.pytorch import Trainer, seed_everything

    from selfexplore.models import ModelSpec
    from selfexplore.prm.verifier import StepVerifierModule
    from selfexplore.training.optim import OptimizerConfig

    seed_everything(0)
    write_jsonl(tmp_path / "train.jsonl", toy_rows(64, 0))
    write_jsonl(tmp_path / "val.jsonl", toy_rows(32, 1))
    module = StepVerifierModule(ModelSpec(path=str(verifier_base)), optimizer=OptimizerConfig(lr=3e-3))
    data = PRMDataModule(str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl"), batch_size=16)
    trainer = Trainer(max_epochs=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      deterministic=True)
    trainer.fit(module, data)
    metrics = trainer.validate(module, data, verbose=False)[0]
    assert metrics["val/auroc"] > 0.99 and metrics["val/balanced_accuracy"] > 0.95
    assert metrics["val/f1"] > 0.9 and metrics["val/negative_f1"] > 0.9
    scores = module.score(["Check the numbers.\n"], [["12 is right", "34 is wrong"]])
    assert scores[0][0] > 0.5 > scores[0][1]


def test_verifier_unit_trains_and_reports_against_the_baseline(tiny_arith_model, tmp_path) -> None:
    from selfexplore.io import read_json
    from selfexplore.prm.unit import VerifierConfig, candidates, run_verifier_unit
    from selfexplore.training.optim import OptimizerConfig

    rows = [{**r, "question_id": f"q{i}"} for i, r in enumerate(toy_rows(48, 2))]
    write_jsonl(tmp_path / "prm.jsonl", rows)
    config = VerifierConfig(epochs=1, batch_size=16, val_fraction=0.25, optimizer=OptimizerConfig(lr=1e-3))
    result = run_verifier_unit(tiny_arith_model, tmp_path / "prm.jsonl", tmp_path / "unit", config,
                               trainer={"accelerator": "cpu"})
    assert read_json(tmp_path / "unit" / "metrics.json") == result
    assert {"auroc", "acc_err", "acc_cor", "f1", "negative_f1", "balanced_accuracy"} <= set(result["verifier"])
    assert result["flag_last_baseline"]["acc_cor"] == 0.0
    assert (tmp_path / "unit" / "verifier" / "config.json").is_file()
    assert any(p.startswith("verifier.val_fraction") for p in VerifierConfig(val_fraction=1.5).problems())

    class Task:
        def split_steps(self, text):
            return text.split("\n")

        def extract_answer(self, text):
            return text.rsplit(" ", 1)[-1]

    samples = [{"question_id": "q", "prompt": "P\n", "completion": c, "correct": ok}
               for c, ok in (("a\nso 1,0", False), ("b\nso 10", True), ("c\nso 10.0", True))]
    (group,) = candidates(samples, Task(), lambda prompts, steps: [[0.5] * len(s) for s in steps],
                          same=lambda a, b: float(a.replace(",", ".")) == float(b.replace(",", ".")))
    assert [c.answer for c in group] == ["1,0", "10", "10"] and group[1].scores == (0.5, 0.5)
