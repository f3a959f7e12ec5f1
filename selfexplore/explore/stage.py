"""The explore stage: rejected rationales of pairs.jsonl -> explore.jsonl + gpairs.jsonl.

Resumable: rationales are cut into chunks of whole questions (about `chunk_size` rationales,
so prefixes shared within a question stay in one cache); each chunk's records are written
atomically as a shard under `explore_shards/` and then marked done in its manifest. A rerun
skips done chunks. Every draw's seed is derived from (seed, question, prefix, draw number), so an
interrupted and resumed run writes exactly what an uninterrupted one does (given the same sampler
model), whatever the world size and the order in which the engine returns the draws.
The manifest records the explorer, the search settings and a hash of the input; a rerun with
any of them changed is refused with a per-key diff unless `force` (see `selfexplore.shards`),
so a finished exploration is never silently replaced.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.granular import build_granular_pairs, explore_stats, pit_agreement
from selfexplore.explore.pit import Rationale, explore_chunks, steps_prefix
from selfexplore.hashing import text_sha256
from selfexplore.io import DataError, iter_jsonl, read_jsonl, require_str, write_json, write_jsonl
from selfexplore.shards import Shard, ShardFolder, StageContext
from selfexplore.validation import raise_problems

if TYPE_CHECKING:  # typing only: importing them would pull torch and the graders into every use
    from selfexplore.sampling import Sampler
    from selfexplore.tasks.base import Problem, Task

log = logging.getLogger(__name__)

SHARD_DIR = "explore_shards"
MANIFEST_FORMAT = 4  # 3: a meta file beside each chunk (any rank may write one); 4: a seed per draw
# Statuses of rationales the sampler gave nothing for (e.g. every prompt over its context).
NO_COMPLETIONS = ("skipped:no_completions", "skipped:sampler_error")


def load_rejected(pairs_path: str | os.PathLike, problems_by_id: Mapping[str, Problem], task: Task,
                  prompt: Callable[[Problem], str] | None = None) -> list[Rationale]:
    """The rejected rationales of a pairs file, once per rejected sample id (first pair wins).

    Each pair must be about its problem: its prompt equal to `prompt(problem)` or, without
    `prompt`, containing the task prompt (as raw and chat-template prompts do). A mismatch means
    the problems were loaded with other task options or data than the pairs, and every grade
    would use another problem's gold answer. An empty file is an error, not an empty result.
    """
    rationales: list[Rationale] = []
    seen: set[str] = set()
    lines = 0
    for line, rec in iter_jsonl(pairs_path):
        lines += 1
        meta = rec.get("meta")
        if not isinstance(meta, dict):
            raise DataError("expected an object", pairs_path, line, "meta")
        sample_id = require_str(meta, "rejected_id", pairs_path, line)
        qid = require_str(meta, "question_id", pairs_path, line)
        pair_prompt = require_str(rec, "prompt", pairs_path, line)
        rejected = require_str(rec, "rejected", pairs_path, line, allow_empty=True)
        chosen = require_str(rec, "chosen", pairs_path, line, allow_empty=True)
        ends = rec.get("rejected_ends", True)
        if not isinstance(ends, bool):
            raise DataError(f"expected true or false, got {ends!r}", pairs_path, line, "rejected_ends")
        if qid not in problems_by_id:
            raise DataError(f"unknown question id {qid!r}", pairs_path, line, "meta.question_id")
        problem = problems_by_id[qid]
        expected = prompt(problem) if prompt is not None else task.prompt(problem).strip()
        if (pair_prompt != expected) if prompt is not None else (expected not in pair_prompt):
            raise DataError(f"not the prompt of problem {qid!r} ({expected[:80]!r}); the pairs were made "
                            "from other problems: are the task options or data path the ones that made them?",
                            pairs_path, line, "prompt")
        if sample_id in seen:
            continue
        seen.add(sample_id)
        rationales.append(Rationale(sample_id, qid, pair_prompt, problem.answer, rejected, chosen, ends))
    if not lines:
        raise DataError("no pairs: the file is empty, so there is nothing to explore", pairs_path)
    return rationales


def chunk_by_question(rationales: list[Rationale], chunk_size: int) -> list[list[Rationale]]:
    """Consecutive chunks of whole questions, each closed once it holds >= chunk_size rationales."""
    by_question: dict[str, list[Rationale]] = {}
    for r in rationales:
        by_question.setdefault(r.question_id, []).append(r)
    chunks: list[list[Rationale]] = []
    current: list[Rationale] = []
    for group in by_question.values():
        current.extend(group)
        if len(current) >= chunk_size:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


def _settings(model: str, config: ExploreConfig, chunks: list[list[Rationale]]) -> dict[str, Any]:
    """What decides the completions drawn: explorer, search settings and the chunked input."""
    blob = json.dumps([[asdict(r) for r in chunk] for chunk in chunks], sort_keys=True)
    return {"model": model, **config.search_fingerprint(),
            "num_rationales": sum(len(chunk) for chunk in chunks),
            "rationales_sha256": text_sha256(blob)}


def _shard_name(index: int) -> str:
    return f"chunk_{index:05d}.jsonl"


def _longest_prefix_tokens(tokenizer: Any, task: Task, rationales: Sequence[Rationale], max_steps: int) -> int:
    """Tokens of the longest prompt the search can send: a pair prompt with its first max_steps steps."""
    texts = []
    for r in rationales:
        steps = task.split_steps(r.text)
        if steps:
            texts.append(r.prompt + steps_prefix(steps, min(len(steps), max_steps)))
    if not texts:
        return 0
    return max(len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"])


def _resolve_new_tokens(sampler: Sampler, task: Task, rationales: Sequence[Rationale],
                        config: ExploreConfig) -> ExploreConfig:
    """The config with a fixed max_new_tokens: an unset one is capped to the explorer's context.

    Both backends expose `context` and `tokenizer`; a sampler without them (a scripted one)
    gets the uncapped default.
    """
    context, tokenizer = getattr(sampler, "context", None), getattr(sampler, "tokenizer", None)
    if config.max_new_tokens is not None or context is None or tokenizer is None:
        return replace(config, max_new_tokens=config.new_tokens())
    longest = _longest_prefix_tokens(tokenizer, task, rationales, config.max_steps)
    if longest >= context:
        raise ValueError(f"explore: the longest prefix to explore has {longest} tokens, the explorer's whole "
                         f"context ({context} tokens); lower explore.max_steps or use an explorer with a "
                         "longer context")
    resolved = config.new_tokens(context - longest)
    if resolved < config.new_tokens():
        log.info("explore: max_new_tokens %d, what the explorer's context of %d tokens leaves after the "
                 "longest prefix (%d tokens)", resolved, context, longest)
    return replace(config, max_new_tokens=resolved)


def _check_completions(records: Sequence[dict[str, Any]], config: ExploreConfig, context: int | None,
                       shard_dir: Path) -> None:
    """Fail when most searched rationales got no completions (the result would be near empty), warn on any."""
    searched = [r for r in records if r["status"] in ("pit", "no_pit", *NO_COMPLETIONS)]
    failed = sum(r["status"] in NO_COMPLETIONS for r in searched)
    if not failed:
        return
    message = (f"explore: {failed} of {len(searched)} rationales got no completions from the explorer "
               f"(what a sampler returns for a prompt that does not fit its context, "
               f"{context if context is not None else 'unknown'} tokens, with "
               f"explore.max_new_tokens={config.max_new_tokens}; sampler errors are logged above)")
    if 2 * failed > len(searched):
        raise RuntimeError(f"{message}. The outputs were not written (shards kept in {shard_dir}): lower "
                           "explore.max_new_tokens or leave it unset (it is then capped to the context), "
                           "and rerun with --force")
    log.warning("%s", message)


def run_explore_stage(sampler: Sampler, task: Task, pairs_path: str | os.PathLike,
                      problems_by_id: Mapping[str, Problem], out_dir: str | os.PathLike,
                      config: ExploreConfig | None = None, context: StageContext | None = None
                      ) -> dict[str, Any] | None:
    """Explore every rejected rationale of `pairs_path`; write explore.jsonl, gpairs.jsonl and
    explore_stats.json into `out_dir`; return the stats.

    `context` (`StageContext`, default: this process alone): `model` names the explorer (e.g. its
    path) for the resume guard; `force` discards shards made with another explorer, other
    settings or other pairs instead of refusing; `prompt` is the prompter that made the pairs'
    prompts (`PromptFormat.prompter`), each pair's prompt is checked against its problem (see
    `load_rejected`); `workers` share the chunks as in `run_sample_stage` (other ranks return None).
    An unset `config.max_new_tokens` becomes the paper's 512 capped to what the explorer's
    context leaves after the longest prefix. When more than half of the searched rationales get
    no completions the stage raises instead of writing a near-empty result; fewer are a warning.
    """
    config = config or ExploreConfig()
    context = context or StageContext()
    raise_problems(config.problems(), "explore config")
    out_dir = Path(out_dir)
    shard_dir = out_dir / SHARD_DIR
    rationales = load_rejected(pairs_path, problems_by_id, task, context.prompt)
    config = _resolve_new_tokens(sampler, task, rationales, config)
    chunks = chunk_by_question(rationales, config.chunk_size)
    folder = ShardFolder(shard_dir, "explore", _settings(context.model, config, chunks), MANIFEST_FORMAT, _shard_name,
                         context)

    def produce(mine: list[int]) -> Generator[Shard, None, None]:
        for i, records in explore_chunks([(i, chunks[i]) for i in mine], sampler, task, config):
            yield i, records, {"rationales": len(chunks[i])}
            log.info("explore: chunk %d/%d done (%d rationales)", i + 1, len(chunks), len(chunks[i]))

    def merge() -> dict[str, Any]:
        records = [rec for i in range(len(chunks)) for rec in read_jsonl(folder.path(i))]
        _check_completions(records, config, getattr(sampler, "context", None), shard_dir)
        pairs = build_granular_pairs(records, config.rejected_mode, round_index=config.round)
        stats = explore_stats(records, pairs)
        stats["mode"] = config.mode
        stats.update(pit_agreement(records,
                                   lambda r: task.first_wrong_step(problems_by_id[r["question_id"]], r["steps"])))
        write_jsonl(out_dir / "explore.jsonl", records)
        write_jsonl(out_dir / "gpairs.jsonl", pairs)
        write_json(out_dir / "explore_stats.json", stats)
        return stats

    return folder.run(len(chunks), produce, merge, {"num_chunks": len(chunks)})
