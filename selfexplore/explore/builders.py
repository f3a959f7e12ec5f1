"""Pure builders from graded samples: the RFT set, outcome-level pairs (D_pair) and statistics.

Input records follow the `samples.jsonl` schema (see CONTRACTS). Continuations (RFT responses,
chosen, rejected) are the sampled completions stripped of surrounding whitespace: the prompt
already ends with the newline that separates it from the first step, and the EOS is added by
the tokenizing data module. `read_samples` reads such a file with every record checked.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Literal, get_args

from selfexplore.io import DataError, iter_jsonl, require_str

_CALC_NOTE = re.compile(r"<<([^<>]*)>>")
# "a op b (op c ...) = r": the left side must hold an operator between two operands.
_EQUATION = re.compile(r"([-+*/×÷^x()\d.,$%\s]+?)=\s*\$?\s*(-?[\d.,]*\d)")
_NOISE = re.compile(r"[\s,$%]")
_HAS_OPERATION = re.compile(r"[\d)]\s*[-+*/×÷^x]\s*[-\d(.$]")

# How two rationales count as the same: same equation sequence, or same normalised text.
Dedupe = Literal["equations", "text"]
DEDUPE_RULES: tuple[str, ...] = get_args(Dedupe)


def check_sample(s: dict[str, Any], where: str | os.PathLike | None = None, line: int | None = None) -> None:
    """Raise DataError at `where` (a file, or a label for records in memory), `line` and the field
    for a record that breaks the samples schema; ids and prompts must be non-empty, as training needs."""
    for field in ("id", "question_id", "prompt"):
        require_str(s, field, where, line)
    require_str(s, "completion", where, line, allow_empty=True)
    for field, required in (("correct", True), ("finished", False)):
        if (required or field in s) and not isinstance(s.get(field), bool):
            raise DataError(f"expected a boolean, got {s.get(field)!r}", where, line, field)


def _check_samples(samples: Sequence[dict[str, Any]]) -> None:
    """Fail early and precisely (sample index and field) on records that break the schema."""
    for i, s in enumerate(samples):
        check_sample(s, f"sample #{i}")


def read_samples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a samples file, each checked (errors name file, line and field).

    An empty or blank file is an error: it would silently turn into empty RFT and pair sets.
    """
    records = []
    for line, s in iter_jsonl(path):
        check_sample(s, path, line)
        records.append(s)
    if not records:
        raise DataError("no samples: the file is empty", path)
    return records


def _group_by_question(samples: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Samples per question, questions and samples in input order (the output order follows it)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault(s["question_id"], []).append(s)
    return groups


def normalize_text(text: str) -> str:
    """Case- and whitespace-insensitive form used to call two rationales the same text."""
    return " ".join(text.lower().split())


def _normalize_equation(expr: str, result: str) -> str:
    expr = expr.replace("×", "*").replace("÷", "/").replace("x", "*")
    return f"{re.sub(_NOISE, '', expr)}={re.sub(_NOISE, '', result)}"


def extract_equations(text: str) -> tuple[str, ...]:
    """The sequence of equations a rationale computes, line by line, normalised.

    A line with GSM8K calculator notes (`<<48/2=24>>`) contributes its notes (the visible
    `48/2 = 24` beside them is the same equation); other lines contribute their `a op b = c`
    patterns. Spaces, thousands separators, `$`, `%` are dropped and `x`/`×`/`÷` become `*`/`/`.
    """
    equations: list[str] = []
    for line in text.splitlines():
        notes = _CALC_NOTE.findall(line)
        if notes:
            for note in notes:
                left, _, right = note.rpartition("=")
                equations.append(_normalize_equation(left, right) if left else _normalize_equation(note, ""))
            continue
        for left, right in _EQUATION.findall(line.lower()):
            left = left.strip().lstrip("+*/×÷^x$ ")  # an operator-like letter ending a word
            if _HAS_OPERATION.search(left):
                equations.append(_normalize_equation(left, right))
    return tuple(equations)


def dedupe_key(text: str, dedupe: Dedupe = "equations") -> Hashable:
    """Two rationales with the same key are duplicates.

    "text": same normalised text. "equations": same equation sequence (the RFT paper's rule for
    GSM8K); a rationale without any equation falls back to its normalised text, so two
    equation-free rationales are not merged just because both have none.
    """
    if dedupe not in DEDUPE_RULES:
        raise ValueError(f"dedupe must be 'equations' or 'text', got {dedupe!r}")
    if dedupe == "equations":
        equations = extract_equations(text)
        if equations:
            return ("equations", equations)
    return ("text", normalize_text(text))


def _kept_correct(group: Sequence[dict[str, Any]], max_per_question: int,
                  dedupe: Dedupe) -> list[dict[str, Any]]:
    """The first `max_per_question` correct, non-empty, mutually distinct samples of a question.

    A sample cut at max_new_tokens (`"finished": false`) is never kept: it is not a whole
    response, and training on it (RFT, a chosen side) would teach stopping where it was cut.
    """
    kept: list[dict[str, Any]] = []
    seen: set[Hashable] = set()
    for s in group:
        if len(kept) >= max_per_question:
            break
        if not s["correct"] or not s.get("finished", True) or not s["completion"].strip():
            continue
        key = dedupe_key(s["completion"], dedupe)
        if key not in seen:
            seen.add(key)
            kept.append(s)
    return kept


def build_rft_set(samples: Sequence[dict[str, Any]], max_per_question: int = 8,
                  dedupe: Dedupe = "equations") -> list[dict[str, Any]]:
    """SFT records from correct, deduplicated samples (at most `max_per_question` per question).

    Samples are taken in input order, so the result is deterministic for a given samples file.
    """
    _check_samples(samples)
    return [
        {"prompt": s["prompt"], "response": s["completion"].strip(),
         "meta": {"question_id": qid, "sample_id": s["id"]}}
        for qid, group in _group_by_question(samples).items()
        for s in _kept_correct(group, max_per_question, dedupe)
    ]


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance between two sequences (Myers/Hyyrö bit-parallel: one big-int row per item).

    Exact and O(len(a)) big-int operations, so pairing thousands of rationales stays cheap in
    pure Python.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[Hashable, int] = {}
    for i, item in enumerate(b):
        peq[item] = peq.get(item, 0) | (1 << i)
    mask, last = (1 << m) - 1, 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for item in a:
        eq = peq.get(item, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & last:
            score += 1
        elif mh & last:
            score -= 1
        ph = (ph << 1) | 1
        mh <<= 1
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv & mask
    return score


def build_outcome_pairs(samples: Sequence[dict[str, Any]], max_pairs_per_chosen: int = 1,
                        round_index: int = 1, max_per_question: int = 8,
                        dedupe: Dedupe = "equations") -> list[dict[str, Any]]:
    """Outcome-level pairs (D_pair): each kept correct rationale against distinct wrong ones.

    Chosen: the RFT selection of a question (`build_rft_set` rules). Rejected: wrong samples of
    the same question, non-empty and distinct by normalised text. For each chosen, in order,
    the wrong rationale with the largest word-level edit distance is picked (the paper pairs
    the most different one; ties go to the earlier sample), and no wrong rationale is reused
    until every wrong one of the question has been used once, so the rejected side stays as
    diverse as the samples allow. `max_pairs_per_chosen` distinct rejected per chosen.
    Questions without a correct or without a wrong sample give no pair. `rejected_ends` is
    false for a rejected sample cut at max_new_tokens: DPO gives it no end token.
    """
    if max_pairs_per_chosen < 1:
        raise ValueError(f"max_pairs_per_chosen must be >= 1, got {max_pairs_per_chosen}")
    _check_samples(samples)
    pairs: list[dict[str, Any]] = []
    for qid, group in _group_by_question(samples).items():
        chosen_list = _kept_correct(group, max_per_question, dedupe)
        wrong: list[dict[str, Any]] = []
        seen: set[str] = set()
        for s in group:
            key = normalize_text(s["completion"])
            if not s["correct"] and key and key not in seen:
                seen.add(key)
                wrong.append(s)
        if not chosen_list or not wrong:
            continue
        wrong_words = [w["completion"].split() for w in wrong]
        used: set[int] = set()
        for c in chosen_list:
            c_words = c["completion"].split()
            dist = [levenshtein(c_words, ww) for ww in wrong_words]
            picked: list[int] = []
            for _ in range(min(max_pairs_per_chosen, len(wrong))):
                free = [j for j in range(len(wrong)) if j not in used and j not in picked]
                if not free:
                    used.clear()
                    free = [j for j in range(len(wrong)) if j not in picked]
                j = max(free, key=lambda idx: (dist[idx], -idx))
                picked.append(j)
                used.add(j)
            for j in picked:
                pairs.append({
                    "prompt": c["prompt"], "chosen": c["completion"].strip(),
                    "rejected": wrong[j]["completion"].strip(),
                    "rejected_ends": wrong[j].get("finished", True),
                    "meta": {"question_id": qid, "source": "outcome", "chosen_id": c["id"],
                             "rejected_id": wrong[j]["id"], "round": round_index},
                })
    return pairs


def sample_stats(samples: Sequence[dict[str, Any]],
                 pairs: Iterable[dict[str, Any]] | None = None) -> dict[str, Any]:
    """How well the policy did on its own questions, and how much preference data that yields.

    pass_rate: mean over questions of the fraction of correct samples; pass_at_n: fraction of
    questions with at least one correct sample (n = samples drawn per question).
    """
    _check_samples(samples)
    groups = _group_by_question(samples)
    rates = [sum(s["correct"] for s in g) / len(g) for g in groups.values()]
    num_q = len(groups)
    stats: dict[str, Any] = {
        "num_questions": num_q,
        "num_samples": len(samples),
        "num_correct": sum(s["correct"] for s in samples),
        "samples_per_question": len(samples) / num_q if num_q else 0.0,
        "pass_rate": sum(rates) / num_q if num_q else 0.0,
        "pass_at_n": sum(r > 0 for r in rates) / num_q if num_q else 0.0,
        "questions_no_correct": sum(r == 0 for r in rates),
        "questions_no_wrong": sum(r == 1 for r in rates),
    }
    if pairs is not None:
        stats["num_pairs"] = sum(1 for _ in pairs)
    return stats
