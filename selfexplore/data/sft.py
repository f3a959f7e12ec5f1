"""SFT data: gold rationales of a task, or any JSONL of prompt/response records (e.g. RFT)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from selfexplore.data.batching import (
    LengthGroupedDistributedSampler,
    data_parallel_replicas,
    encode_prompt_completion,
    pad_right,
)
from selfexplore.io import DataError, iter_jsonl, require_str
from selfexplore.models import load_tokenizer
from selfexplore.models.chat import PromptFormat, completion_end_id
from selfexplore.tasks import Problem, get_task


@dataclass(frozen=True)
class SFTExample:
    input_ids: list[int]
    labels: list[int]  # -100 where no loss is taken


class SFTDataset(Dataset):
    def __init__(self, examples: list[SFTExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> SFTExample:
        return self.examples[i]


def tokenize_sft(tokenizer, pairs: list[tuple[str, str]], max_length: int, include_prompt: bool,
                 overlong: Literal["drop", "truncate"]) -> tuple[list[SFTExample], dict[str, int]]:
    """Prompt/response pairs -> examples; counts of dropped and truncated ones.

    Loss is on the response and its end token (EOS, or the chat template's end-of-turn: see
    `completion_end_id`), and on the prompt too when `include_prompt`, as the paper's SFT did.
    Over-long examples are dropped, or their response end is cut ('truncate'; an example whose
    prompt alone fills `max_length` is always dropped).
    """
    examples, stats = [], {"dropped_overlong": 0, "truncated": 0}
    end_id = completion_end_id(tokenizer)
    for prompt, response in pairs:
        p_ids, c_ids = encode_prompt_completion(tokenizer, prompt, response, end_id)
        if len(p_ids) + len(c_ids) > max_length:
            if overlong == "drop" or len(p_ids) >= max_length:
                stats["dropped_overlong"] += 1
                continue
            c_ids = c_ids[: max_length - len(p_ids)]
            stats["truncated"] += 1
        prompt_labels = list(p_ids) if include_prompt else [-100] * len(p_ids)
        examples.append(SFTExample(input_ids=p_ids + c_ids, labels=prompt_labels + c_ids))
    return examples, stats


def read_prompt_response_jsonl(path: str | Path) -> list[tuple[str, str]]:
    """(prompt, response) pairs of a JSONL file, e.g. the RFT set; errors name file/line/field."""
    return [(require_str(r, "prompt", path, line, allow_empty=True), require_str(r, "response", path, line))
            for line, r in iter_jsonl(path)]


class SFTDataModule(LightningDataModule):
    """Gold rationales (or `train_path` records) for training; problems for greedy evaluation.

    Args:
        task: registered task name ('arith', 'gsm8k', 'math').
        task_options: keyword options for the task (e.g. arith difficulty knobs).
        data_dir: folder with `{train,validation,test}.jsonl` for file-based tasks (GSM8K);
            a missing split file is an error only when that split is used.
        train_path: JSONL of `prompt`/`response` records that replaces the task's train split.
        tokenizer_path: tokenizer folder; by default the policy's (the LightningModule's).
        max_length: tokens per example; longer ones are dropped or truncated (`overlong`).
        include_prompt_in_loss: train on the prompt tokens too (the paper did).
        train_limit: train on the first N problems of the train split only (None: all).
        val_limit / test_limit: evaluate on the first N problems only (greedy decoding is slow).
        prompt_format: raw task prompts (default, the paper) or the tokenizer's chat template;
            applies to the task's problems, not to `train_path` records (already prompts).
    """

    def __init__(
        self,
        task: str = "arith",
        task_options: dict[str, Any] | None = None,
        data_dir: str | None = None,
        train_path: str | None = None,
        tokenizer_path: str | None = None,
        max_length: int = 384,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        include_prompt_in_loss: bool = False,
        overlong: Literal["drop", "truncate"] = "drop",
        length_grouped: bool = True,
        train_limit: int | None = None,
        val_limit: int | None = 200,
        test_limit: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        prompt_format: PromptFormat | None = None,
    ) -> None:
        super().__init__()
        self.task = get_task(task, **(task_options or {}))
        self.prompt_format = prompt_format or PromptFormat()
        self.data_dir = data_dir
        self.train_path = train_path
        self.tokenizer_path = tokenizer_path
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.include_prompt_in_loss = include_prompt_in_loss
        self.overlong = overlong
        self.length_grouped = length_grouped
        self.train_limit = train_limit
        self.val_limit = val_limit
        self.test_limit = test_limit
        self.num_workers = num_workers
        self.seed = seed
        self.stats: dict[str, int] = {}
        self.train_set: SFTDataset | None = None
        self.eval_problems: dict[str, list[Problem]] = {}

    def problems(self, split: str) -> list[Problem]:
        path = Path(self.data_dir) / f"{split}.jsonl" if self.data_dir else None
        return self.task.load(split, path=path)

    def corpus_texts(self) -> list[str]:
        """Training text, for a tokenizer trained from scratch (raw prompts: it has no template yet)."""
        return [self.task.prompt(p) + p.solution for p in self.problems("train")]

    def _train_pairs(self) -> list[tuple[str, str]]:
        if self.train_path:
            return read_prompt_response_jsonl(self.train_path)
        return [(self._prompt(p), p.solution) for p in self.problems("train")[: self.train_limit]]

    def setup(self, stage: str) -> None:
        tokenizer = (load_tokenizer(self.tokenizer_path) if self.tokenizer_path
                     else self.trainer.lightning_module.tokenizer)
        self._prompt = self.prompt_format.prompter(self.task, tokenizer)
        if stage == "fit" and self.train_set is None:
            pairs = self._train_pairs()
            examples, self.stats = tokenize_sft(tokenizer, pairs, self.max_length,
                                                self.include_prompt_in_loss, self.overlong)
            self.stats["records"] = len(pairs)
            self.stats["examples"] = len(examples)
            if not examples:
                source = self.train_path or f"task '{self.task.name}' train split"
                raise DataError(f"no usable training examples ({self.stats}); "
                                f"raise max_length (now {self.max_length}) or check the data", source)
            self.train_set = SFTDataset(examples)
            rank_zero_info(f"SFT data: {self.stats}")
        split, limit = ("test", self.test_limit) if stage == "test" else ("validation", self.val_limit)
        if split not in self.eval_problems:  # limit 0: no eval, and no need for that split's file
            self.eval_problems[split] = self.problems(split)[:limit] if limit != 0 else []
        self._tokenizer = tokenizer

    def _collate_train(self, batch: list[SFTExample]) -> dict[str, torch.Tensor]:
        input_ids = pad_right([e.input_ids for e in batch], self._tokenizer.pad_token_id)
        mask = pad_right([[1] * len(e.input_ids) for e in batch], 0)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad_right([e.labels for e in batch], -100)}

    def _collate_eval(self, problems: list[Problem]) -> dict[str, Any]:
        pairs = [(self._prompt(p), p.solution) for p in problems]
        examples, _ = tokenize_sft(self._tokenizer, pairs, self.max_length, False, "truncate")
        batch = self._collate_train(examples) if len(examples) == len(problems) else {}
        return {**batch, "prompts": [prompt for prompt, _ in pairs], "golds": [p.answer for p in problems]}

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_set
        sampler = (LengthGroupedDistributedSampler([len(e.input_ids) for e in dataset.examples], self.batch_size,
                                                   seed=self.seed, **data_parallel_replicas(self.trainer))
                   if self.length_grouped else None)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, shuffle=sampler is None,
                          collate_fn=self._collate_train, num_workers=self.num_workers)

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(self.eval_problems[split], batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self._collate_eval, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

