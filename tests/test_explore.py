"""Explore package: RFT/outcome builders, first-pit search, granular pairs, resumable stage.

Samplers and the task are fakes defined here, with outcomes known in advance.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, replace

import pytest

from selfexplore.completion import Completion
from selfexplore.explore import (
    ExploreConfig,
    Rationale,
    build_granular_pairs,
    build_outcome_pairs,
    build_rft_set,
    explore_stats,
    find_first_pits,
    run_explore_stage,
    sample_stats,
)
from selfexplore.explore.builders import extract_equations, levenshtein
from selfexplore.explore.config import doubling_waves
from selfexplore.explore.granular import pit_agreement
from selfexplore.explore.pit import explore_chunks
from selfexplore.io import DataError, read_jsonl, write_jsonl
from selfexplore.sampling.base import DrawParams, prompt_seed, truncate_at_stop
from selfexplore.shards import StageContext
from selfexplore.streaming import BatchedStream, share_tokens

_ANSWER = re.compile(r"The answer is (-?\d+)")


class FakeTask:
    """GSM8K-like: one step per line, the last 'The answer is N' is the answer.

    Blank lines inside a rationale are kept as (empty) steps so the empty-step rule can be hit.
    """

    name = "fake"

    def prompt(self, problem) -> str:
        return problem.question.strip() + "\n"

    def split_steps(self, text: str) -> list[str]:
        return text.strip().split("\n") if text.strip() else []

    def extract_answer(self, text: str) -> str | None:
        found = _ANSWER.findall(text)
        return found[-1] if found else None

    def is_correct(self, text: str, gold: str) -> bool:
        return self.extract_answer(text) == gold

    def first_wrong_step(self, problem, steps: list[str]) -> int | None:
        return None  # free-form rationales (the Task default)


TASK = FakeTask()
GOLD = "10"
OK = "5 * 2 = 10\nThe answer is 10"          # a correct continuation
SHORT_OK = "The answer is 10"                  # the shortest correct continuation
BAD = "5 * 2 = 11\nThe answer is 11"          # a wrong continuation
Q = "Q1: what is it?\n"
STEPS = ["1 + 1 = 2", "2 + 3 = 6", "6 * 2 = 12", "The answer is 12"]
WRONG = "\n".join(STEPS)


def prefix(t: int, steps: list[str] = STEPS, q: str = Q) -> str:
    return q + "\n".join(steps[:t]) + "\n"


class ScriptedSampler:
    """Returns, per prompt, the next scripted completions in order; logs every call."""

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.queues = {p: deque(c) for p, c in script.items()}
        self.calls: list[tuple[tuple[str, ...], int, int]] = []
        self.generated_tokens = 0

    def generate(self, prompts, n, draws, seed):
        self.calls.append((tuple(prompts), n, seed))
        out = [[self.queues[p].popleft() for _ in range(n)] for p in prompts]
        self.generated_tokens += sum(len(c.split()) + 1 for cs in out for c in cs)
        return out

    def requested(self, prompt: str) -> int:
        return sum(n for prompts, n, _ in self.calls for p in prompts if p == prompt)


class RandomSampler:
    """A step line 'p=0.4 ...' succeeds with probability 0.4 per completion (other lines: 0).

    Outputs depend only on (the prompt's seed, prompt), like a seeded real sampler: the call's
    seed and the prompt's position, or the prompt's own seed (`prompt_seed`). Completions
    carry their token counts, as both backends' do.
    """

    def __init__(self, gold: str = GOLD) -> None:
        self.gold, self.generated_tokens, self.calls, self.rows = gold, 0, 0, []

    def generate(self, prompts, n, draws, seed):
        self.calls += 1
        self.rows.append(len(prompts) * n)
        out = []
        for i, prompt in enumerate(prompts):
            last = prompt.rstrip("\n").split("\n")[-1]
            m = re.match(r"p=([\d.]+)", last)
            p = float(m.group(1)) if m else 0.0
            rng = random.Random(f"{prompt_seed(seed, i)}|{prompt}")
            texts = [f"x\nThe answer is {self.gold}" if rng.random() < p else "y\nThe answer is 999" for _ in range(n)]
            out.append([Completion(x, True, len(x.split()) + 1) for x in texts])
        self.generated_tokens += sum(c.tokens for cs in out for c in cs)
        return out


def rationale(text: str = WRONG, sid: str = "q1:0", qid: str = "q1", q: str = Q,
              chosen: str = "1 + 1 = 2\n2 + 3 = 5\n5 * 2 = 10\nThe answer is 10") -> Rationale:
    return Rationale(sample_id=sid, question_id=qid, prompt=q, gold=GOLD, text=text, pair_chosen=chosen)


def explore(rats, script=None, sampler=None, **cfg):
    sampler = sampler or ScriptedSampler(script)
    return find_first_pits(rats, sampler, TASK, ExploreConfig(**cfg)), sampler


# ------------------------------------------------------------------ first-pit search

@pytest.mark.parametrize("mode", ["adaptive", "exhaustive"])
def test_pit_at_first_step(mode):
    (rec,), sampler = explore([rationale()], {prefix(1): [BAD] * 4}, mode=mode)
    assert rec["status"] == "pit" and rec["pit"] == 1
    assert rec["outcomes"] == [{"step": 1, "completions": [BAD] * 4, "correct": [False] * 4,
                               "finished": [True] * 4}]
    assert rec["steps"] == STEPS and rec["gold"] == GOLD and rec["sample_id"] == "q1:0"
    (pair,) = build_granular_pairs([rec])
    assert pair["prompt"] == Q and pair["rejected"] == STEPS[0]
    assert pair["chosen"] == rec["pair_chosen"]
    assert pair["meta"] == {"question_id": "q1", "source": "explore", "pit_step": 1, "num_steps": 4,
                            "source_sample_id": "q1:0", "round": 1}


def test_pit_in_the_middle_adaptive_stops_each_step_at_first_success():
    script = {prefix(1): [BAD, OK, OK, OK], prefix(2): [BAD] * 4}
    (rec,), sampler = explore([rationale()], script)
    assert rec["status"] == "pit" and rec["pit"] == 2
    assert rec["outcomes"][0] == {"step": 1, "completions": [BAD, OK], "correct": [False, True],
                                  "finished": [True, True]}
    assert sampler.requested(prefix(1)) == 2 and sampler.requested(prefix(2)) == 4
    assert [len(ps) for ps, _, _ in sampler.calls] == [1, 1, 1, 1, 2]  # waves 1, 1 | 1, 1, 2
    (pair,) = build_granular_pairs([rec])
    assert pair["prompt"] == Q + "1 + 1 = 2\n"
    assert pair["rejected"] == "2 + 3 = 6" and pair["chosen"] == OK
    assert (pair["prompt"] + pair["chosen"]).endswith("The answer is 10")


def test_no_pit_is_recorded_and_gives_no_pair():
    script = {prefix(t): [OK] * 4 for t in range(1, 5)}
    (rec,), sampler = explore([rationale()], script)
    assert rec["status"] == "no_pit" and rec["pit"] is None and len(rec["outcomes"]) == 4
    assert build_granular_pairs([rec]) == []


def test_max_steps_caps_the_search():
    script = {prefix(t): [OK] * 4 for t in range(1, 5)}
    (rec,), sampler = explore([rationale()], script, max_steps=2)
    assert rec["status"] == "no_pit" and len(rec["outcomes"]) == 2
    assert prefix(3) not in {p for ps, _, _ in sampler.calls for p in ps}


def test_pit_on_the_answer_line_rejects_that_line_never_empty():
    script = {prefix(1): [OK] * 4, prefix(2): [OK] * 4, prefix(3): [BAD, OK, SHORT_OK, BAD],
              prefix(4): ["", "", "", ""]}
    (rec,), _ = explore([rationale()], script, mode="exhaustive")
    assert rec["pit"] == 4 == len(rec["steps"])
    for mode in ("pit_step", "pit_to_end"):
        (pair,) = build_granular_pairs([rec], rejected_mode=mode)
        assert pair["rejected"] == "The answer is 12"
        assert pair["chosen"] == SHORT_OK  # shortest correct completion of the step-3 prefix
        assert pair["prompt"] == prefix(3)
        assert pair["rejected_ends"] is True  # the answer line ends the response


def test_shared_prefixes_are_explored_once_in_adaptive_mode():
    steps_b = STEPS[:2] + ["6 - 1 = 5", "The answer is 5"]
    rats = [rationale(), rationale("\n".join(steps_b), sid="q1:1")]
    script = {prefix(1): [OK] * 8, prefix(2): [OK] * 8, prefix(3): [BAD] * 4,
              prefix(3, steps_b): [BAD] * 4}
    recs, sampler = explore(rats, script)
    assert [r["pit"] for r in recs] == [3, 3]
    assert sampler.requested(prefix(1)) == 1 and sampler.requested(prefix(2)) == 1
    # both rationales advance in the same sampler calls (one call per wave)
    assert any(prefix(3) in ps and prefix(3, steps_b) in ps for ps, _, _ in sampler.calls)
    # the shared prefixes' tokens are charged once, to the first rationale
    assert sum(r["tokens_generated"] for r in recs) == sampler.generated_tokens
    assert recs[0]["tokens_generated"] > recs[1]["tokens_generated"] > 0
    exhaustive, sampler_ex = explore(rats, script, mode="exhaustive")
    assert sampler_ex.requested(prefix(1)) == 8 and [r["pit"] for r in exhaustive] == [3, 3]


def test_one_call_per_wave_mixes_wave_sizes_with_repeated_prompts():
    q2 = "Q2: and this?\n"
    rats = [rationale(), rationale(sid="q2:0", qid="q2", q=q2)]
    script = {prefix(1): [BAD] * 4, prefix(1, q=q2): [OK], prefix(2, q=q2): [BAD, BAD, OK, BAD],
              prefix(3, q=q2): [OK], prefix(4, q=q2): [""] * 4}
    recs, sampler = explore(rats, script)
    assert [r["pit"] for r in recs] == [1, 4]
    assert all(n == 1 for _, n, _ in sampler.calls)
    third = sampler.calls[2][0]  # wave 3 of q1's step 1 (2 draws) beside wave 2 of q2's step 2 (1 draw)
    assert third == (prefix(1), prefix(1), prefix(2, q=q2))
    assert recs[0]["outcomes"] == [{"step": 1, "completions": [BAD] * 4, "correct": [False] * 4,
                                    "finished": [True] * 4}]
    assert recs[1]["outcomes"][1] == {"step": 2, "completions": [BAD, BAD, OK, BAD],
                                      "correct": [False, False, True, False], "finished": [True] * 4}


def test_prefix_cache_is_per_question():
    rats = [rationale(), rationale(sid="q2:0", qid="q2")]  # same text and prompt, other question
    recs, sampler = explore(rats, {prefix(1): [BAD] * 8})
    assert sampler.requested(prefix(1)) == 8 and [r["pit"] for r in recs] == [1, 1]


def test_wave_early_stop_requests_fewer_completions_same_pit():
    script = {prefix(1): [OK] * 4, prefix(2): [OK, BAD, BAD, BAD], prefix(3): [BAD] * 4}
    (ad,), s_ad = explore([rationale()], script)
    (ex,), s_ex = explore([rationale()], script, mode="exhaustive")
    assert ad["pit"] == ex["pit"] == 3
    assert sum(n * len(p) for p, n, _ in s_ad.calls) == 1 + 1 + 4
    assert sum(n * len(p) for p, n, _ in s_ex.calls) == 12
    assert s_ad.generated_tokens < s_ex.generated_tokens


def paper_pit(outcomes_per_step: list[list[bool]], k: int) -> int | None:
    """The paper's rule, written out: the first step whose k tries all fail."""
    for t, tries in enumerate(outcomes_per_step, start=1):
        if not any(tries[:k]):
            return t
    return None


def test_both_modes_follow_the_paper_rule_on_scripted_outcomes():
    rng = random.Random(7)
    rats, script, truth = [], {}, []
    for i in range(60):
        q = f"Q{i}?\n"
        steps = [f"{i} + {t} = {i + t}" for t in range(rng.randint(2, 6))] + ["The answer is 1"]
        ok = [[rng.random() < 0.45 for _ in range(4)] for _ in steps[:-1]] + [[False] * 4]
        for t, tries in enumerate(ok, start=1):
            script[prefix(t, steps, q)] = [OK if good else BAD for good in tries]
        rats.append(rationale("\n".join(steps), sid=f"q{i}:0", qid=f"q{i}", q=q))
        truth.append(paper_pit(ok, 4))
    for mode in ("exhaustive", "adaptive"):
        recs, _ = explore(rats, script, mode=mode)
        assert [r["pit"] for r in recs] == truth
        if mode == "exhaustive":  # k draws at every step up to the pit, as in the paper
            assert all(len(o["completions"]) == 4 for r in recs for o in r["outcomes"])
            assert all(len(r["outcomes"]) == r["pit"] for r in recs)


def test_adaptive_and_exhaustive_give_the_paper_pit_distribution():
    """Chi-square against the exact law P(pit=t) = prod_{s<t}(1 - q_s) q_t, q_s = (1 - p_s)^k."""
    probs, k, n = [0.6, 0.5, 0.4, 0.3], 4, 2000
    steps = [f"p={p} step {s}" for s, p in enumerate(probs, 1)] + ["The answer is 999"]
    rats = [rationale("\n".join(steps), sid=f"q{i}:0", qid=f"q{i}", q=f"Q{i}?\n") for i in range(n)]
    q = [(1 - p) ** k for p in probs] + [1.0]
    expected, alive = [], 1.0
    for qt in q:
        expected.append(n * alive * qt)
        alive *= 1 - qt
    hists, tokens = {}, {}
    for mode in ("adaptive", "exhaustive"):
        sampler = RandomSampler()
        recs = find_first_pits(rats, sampler, TASK, ExploreConfig(mode=mode, seed=3))
        hist = Counter(r["pit"] for r in recs)
        hists[mode] = [hist[t] for t in range(1, len(steps) + 1)]
        tokens[mode] = sampler.generated_tokens
        chi2 = sum((o - e) ** 2 / e for o, e in zip(hists[mode], expected))
        assert chi2 < 18.47, (mode, hists[mode], expected)  # df=4, p=0.001
    # two-sample test between the modes (df=4, p=0.001)
    a, b = hists["adaptive"], hists["exhaustive"]
    chi2 = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b) if x + y)
    assert chi2 < 18.47, (a, b)
    assert tokens["adaptive"] < 0.75 * tokens["exhaustive"]


def test_every_draw_has_its_own_seed_a_function_of_the_seed_and_the_prefix():
    script = {prefix(1): [BAD, OK], prefix(2): [BAD] * 4}
    _, s1 = explore([rationale()], dict(script), seed=5)
    _, s2 = explore([rationale()], dict(script), seed=5)
    seeds = [seed for _, _, call_seeds in s1.calls for seed in call_seeds]
    assert seeds == [seed for _, _, call_seeds in s2.calls for seed in call_seeds]
    assert len(seeds) == 2 + 4 and len(set(seeds)) == len(seeds)  # one per draw, none repeated
    _, other = explore([rationale()], dict(script), seed=6)
    assert not set(seeds) & {seed for _, _, call_seeds in other.calls for seed in call_seeds}


def random_rationales(num_questions=6, per_question=3, seed=2):
    """Rationales whose steps succeed with known probabilities (RandomSampler), a shared first step per question."""
    rng = random.Random(seed)
    rats = []
    for qi in range(num_questions):
        shared = [f"p={rng.choice([0.5, 0.7])} q{qi} base"]
        for j in range(per_question):
            steps = shared + [f"p={rng.choice([0.2, 0.5, 0.8])} q{qi} s{j} t{t}" for t in range(rng.randint(1, 4))]
            rats.append(rationale("\n".join(steps + ["The answer is 3"]), sid=f"q{qi}:{j}", qid=f"q{qi}",
                                  q=f"Q{qi}?\n"))
    return rats


@pytest.mark.parametrize("mode", ["adaptive", "exhaustive"])
def test_records_do_not_depend_on_the_schedule_the_batching_or_the_order_draws_come_back(mode):
    rats = random_rationales()
    config = ExploreConfig(mode=mode, seed=4)
    waves = find_first_pits(rats, RandomSampler(), TASK, replace(config, schedule="waves"))
    assert len({r["pit"] for r in waves}) >= 3  # pits at several steps: the rationales move apart
    assert find_first_pits(rats, RandomSampler(), TASK, config) == waves
    for capacity in (1, 3, 1000):  # one row per call, a few, everything at once
        stream = BatchedStream(RandomSampler(), DrawParams(), capacity)
        ((_, records),) = explore_chunks([(0, rats)], None, TASK, config, stream=stream)
        assert records == waves
    shuffled = ShuffledStream(RandomSampler(), DrawParams(), 8)
    ((_, records),) = explore_chunks([(0, rats)], None, TASK, config, stream=shuffled)
    assert records == waves and shuffled.reordered
    # Explored alone, a rationale draws what it drew beside the others (only who pays for a
    # prefix shared within a question changes).
    def drawn(records):
        return [{k: v for k, v in r.items() if k != "tokens_generated"} for r in records]
    alone = [find_first_pits([r], RandomSampler(), TASK, config)[0] for r in rats]
    assert drawn(alone) == drawn(waves)


class ShuffledStream(BatchedStream):
    """Returns finished requests last first, as an engine that finishes short completions first may."""

    reordered = False

    def collect(self):
        done = super().collect()
        self.reordered |= len(done) > 1
        return done[::-1]


class EngineLikeStream(BatchedStream):
    """A stream whose batches, like continuous batching's, are not reproducible: chunks may overlap."""

    reproducible_batches = False


def test_the_stream_schedule_keeps_calls_full_where_waves_leave_them_part_empty():
    rats = random_rationales(num_questions=12)
    runs = {}
    for name, schedule, stream_type in (("waves", "waves", BatchedStream), ("stream", "stream", BatchedStream),
                                        ("engine", "stream", EngineLikeStream)):
        sampler = RandomSampler()
        sampler.batch_size = 8
        stream = stream_type(sampler, DrawParams())
        chunks = [(i, rats[i * 6:(i + 1) * 6]) for i in range(6)]
        results = dict(explore_chunks(chunks, sampler, TASK, ExploreConfig(seed=4, schedule=schedule), stream=stream))
        runs[name] = (stream.counters, results)
    waves, stream, engine = (runs[name][0] for name in ("waves", "stream", "engine"))
    assert runs["waves"][1] == runs["stream"][1] == runs["engine"][1] and waves.rows == stream.rows == engine.rows
    assert stream.calls < waves.calls and stream.occupancy > waves.occupancy
    # Over generate calls chunks go one at a time (see the data-parallel tests); an engine overlaps them.
    assert engine.calls < stream.calls and engine.occupancy > stream.occupancy


def test_token_shares_add_up_exactly():
    assert share_tokens(10, [1, 1, 1]) == [4, 3, 3]
    assert share_tokens(7, [0, 0]) == [4, 3]
    shares = share_tokens(1001, [5, 17, 0, 3])
    assert sum(shares) == 1001 and shares[2] == 0 and shares[1] > shares[0] > shares[3]


def test_doubling_waves_and_config_validation():
    assert doubling_waves(4) == (1, 1, 2) and doubling_waves(8) == (1, 1, 2, 4)
    assert ExploreConfig(k=4, mode="exhaustive").wave_sizes() == (4,)
    assert ExploreConfig(k=3, waves=[2, 1]).wave_sizes() == (2, 1)
    assert ExploreConfig(k=4, waves=(1, 1)).problems() == ["explore.waves [1, 1] must be positive and sum to k=4"]
    assert ExploreConfig(mode="greedy", top_p=1.5).problems() == [  # type: ignore[arg-type]
        "explore.top_p must be in (0, 1], got 1.5",
        "explore.mode must be one of ('adaptive', 'exhaustive'), got 'greedy'"]


class FlakySampler(ScriptedSampler):
    """Raises on prompts containing 'TOO LONG'; returns no completions for 'EMPTY'."""

    def generate(self, prompts, n, draws, seed):
        if any("TOO LONG" in p for p in prompts):
            self.calls.append((tuple(prompts), n, seed))
            raise ValueError("prompt longer than the context")
        if len(prompts) == 1 and "EMPTY" in prompts[0]:
            self.calls.append((tuple(prompts), n, seed))
            return [[]]
        return super().generate(prompts, n, draws, seed)


def test_bad_inputs_are_skipped_and_counted_never_crash():
    rats = [
        rationale("The answer is 3", sid="one"),                       # one step
        rationale("1 + 1 = 2\n2 + 2 = 4", sid="noans"),                # no answer line
        rationale("1 + 1 = 2\n   \nThe answer is 3", sid="blank"),     # whitespace step
        rationale("", sid="empty"),
        rationale("1 + 1 = 2\nThe answer is 10", sid="right"),         # not wrong
        rationale(WRONG, sid="long", q="TOO LONG question\n"),
        rationale(WRONG, sid="void", qid="q2", q="EMPTY question\n"),
        rationale(WRONG, sid="good", qid="q3"),                        # explored normally
    ]
    sampler = FlakySampler({prefix(1): [BAD] * 4})
    recs = find_first_pits(rats, sampler, TASK, ExploreConfig())
    status = {r["sample_id"]: r["status"] for r in recs}
    assert status == {"one": "skipped:single_step", "noans": "skipped:no_answer",
                      "blank": "skipped:empty_step", "empty": "skipped:no_steps",
                      "right": "skipped:not_wrong", "long": "skipped:sampler_error",
                      "void": "skipped:no_completions", "good": "pit"}
    assert all(r["pit"] is None for r in recs if r["sample_id"] != "good")
    assert len(sampler.calls[0][0]) == 3  # the batch, then each prompt on its own
    stats = explore_stats(recs, build_granular_pairs(recs))
    assert stats["skipped"] == {"skipped:empty_step": 1, "skipped:no_answer": 1, "skipped:no_completions": 1,
                                "skipped:no_steps": 1, "skipped:not_wrong": 1,
                                "skipped:sampler_error": 1, "skipped:single_step": 1}
    assert stats["num_explored"] == 1 and stats["num_pairs"] == 1


# ------------------------------------------------------------------ granular pairs

def record(pit, steps=STEPS, status="pit", outcomes=None, sid="q1:0", qid="q1", chosen="C full"):
    return {"sample_id": sid, "question_id": qid, "prompt": Q, "gold": GOLD, "steps": steps,
            "outcomes": outcomes or [], "pit": pit, "status": status, "tokens_generated": 10,
            "pair_chosen": chosen}


def outcome(step, pairs):
    return {"step": step, "completions": [c for c, _ in pairs], "correct": [ok for _, ok in pairs]}


def test_granular_pit_after_first_step_uses_shortest_correct_and_modes():
    outs = [outcome(1, [(OK, True)]), outcome(2, [(BAD, False), (" " + OK + "\n", True), (SHORT_OK, True)]),
            outcome(3, [(BAD, False)] * 4)]
    rec = record(3, outcomes=outs)
    (step,) = build_granular_pairs([rec], rejected_mode="pit_step", round_index=2)
    assert step["prompt"] == Q + "1 + 1 = 2\n2 + 3 = 6\n"
    assert step["chosen"] == SHORT_OK and step["rejected"] == "6 * 2 = 12"
    assert step["meta"]["pit_step"] == 3 and step["meta"]["round"] == 2
    assert step["rejected_ends"] is False  # more steps follow the pit step: no end token in DPO
    (to_end,) = build_granular_pairs([rec], rejected_mode="pit_to_end")
    assert to_end["rejected"] == "6 * 2 = 12\nThe answer is 12" and to_end["rejected_ends"] is True
    assert to_end["prompt"] + to_end["rejected"] == Q + WRONG  # the whole rejected rationale


def test_granular_pit_one_pit_to_end_and_no_pit_and_skipped():
    (pair,) = build_granular_pairs([record(1, outcomes=[outcome(1, [(BAD, False)])])],
                                   rejected_mode="pit_to_end")
    assert pair["prompt"] == Q and pair["rejected"] == WRONG and pair["chosen"] == "C full"
    assert build_granular_pairs([record(None, status="no_pit"), record(None, status="skipped:no_answer")]) == []


def test_granular_never_empty_or_equal():
    empty_chosen = record(1, chosen="   ")
    only_blank_correct = record(2, outcomes=[outcome(1, [("  \n", True)]), outcome(2, [(BAD, False)])])
    equal = record(1, chosen=STEPS[0], sid="q1:2")
    assert build_granular_pairs([empty_chosen, only_blank_correct, equal]) == []


def test_granular_dedup_per_question():
    outs = [outcome(1, [(OK, True)]), outcome(2, [(BAD, False)] * 4)]
    other_steps = [STEPS[0], "2 + 3 = 7", "The answer is 14"]
    recs = [
        record(2, outcomes=outs, sid="a"),
        record(2, outcomes=outs, sid="b"),                       # same chosen and rejected: dropped
        record(2, steps=other_steps, outcomes=outs, sid="c"),   # same chosen (shared prefix): dropped
        record(2, outcomes=outs, sid="d", qid="q2"),             # other question: kept
        record(1, sid="e"),                                      # new rejected s_1, new chosen: kept
        record(1, sid="f", chosen="Other chosen"),               # rejected s_1 already seen: dropped
    ]
    pairs = build_granular_pairs(recs)
    assert [p["meta"]["source_sample_id"] for p in pairs] == ["a", "d", "e"]
    stats = explore_stats(recs, pairs)
    assert stats["pairs_dropped"] == 3 and stats["pairs_per_question"] == 1.5


def test_explore_stats():
    recs = [record(1, sid="a"), record(3, sid="b"), record(3, sid="c", qid="q2"),
            record(None, status="no_pit", sid="d"), record(None, status="skipped:single_step", sid="e")]
    stats = explore_stats(recs, [{"x": 1}, {"x": 2}])
    assert stats["pit_histogram"] == {"1": 1, "3": 2} and stats["num_pits"] == 3
    assert stats["no_pit_fraction"] == 0.25 and stats["skipped"] == {"skipped:single_step": 1}
    assert stats["tokens_generated"] == 50 and stats["tokens_per_pit"] == 50 / 3
    assert stats["tokens_per_pair"] == 25 and stats["pairs_per_question"] == 1.0
    assert stats["mean_pit_step"] == pytest.approx(7 / 3)


def test_granular_rejects_malformed_records():
    bad = record(7)  # pit beyond the steps
    with pytest.raises(DataError, match="pit"):
        build_granular_pairs([bad])
    with pytest.raises(DataError, match="steps"):
        build_granular_pairs([{k: v for k, v in record(1).items() if k != "steps"}])


# ------------------------------------------------------------------ RFT and outcome pairs

def sample(qid, k, completion, correct, prompt="Q?\n"):
    return {"id": f"{qid}:{k}", "question_id": qid, "prompt": prompt, "completion": completion,
            "answer": None, "gold": "10", "correct": correct, "backend": "fake", "seed": 0}


def test_rft_text_dedupe_cap_and_format():
    samples = [sample("a", 0, "Two plus 3 = 5\nThe answer is 10", True),
               sample("a", 1, "two  plus 3 = 5\nthe answer is 10\n", True),  # same text
               sample("a", 2, "wrong\nThe answer is 9", False),
               sample("a", 3, "   ", True),
               sample("a", 4, "Another way\nThe answer is 10", True),
               sample("a", 5, "Third way\nThe answer is 10", True),
               sample("b", 0, "b way\nThe answer is 10", True)]
    rft = build_rft_set(samples, max_per_question=2, dedupe="text")
    assert [r["meta"]["sample_id"] for r in rft] == ["a:0", "a:4", "b:0"]
    assert rft[0] == {"prompt": "Q?\n", "response": "Two plus 3 = 5\nThe answer is 10",
                      "meta": {"question_id": "a", "sample_id": "a:0"}}


def test_rft_equation_dedupe():
    gsm_a = "She sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\nThe answer is 72"
    gsm_b = "May: 48 / 2 = <<48/2=24>>24\nSo 48 + 24 = <<48+24=72>>72 clips\nThe answer is 72"
    plain_a = "First 3 x 4 = 12\nthen 12 - 2 = 10\nThe answer is 10"
    plain_b = "We get 3 * 4 = 12 apples.\nNow 12 - 2 = 10.\nThe answer is 10"
    plain_c = "We get 4 * 3 = 12 apples.\nNow 12 - 2 = 10.\nThe answer is 10"
    assert extract_equations(gsm_a) == extract_equations(gsm_b) == ("48/2=24", "48+24=72")
    assert extract_equations(plain_a) == ("3*4=12", "12-2=10")
    samples = [sample("g", 0, gsm_a, True), sample("g", 1, gsm_b, True),
               sample("p", 0, plain_a, True), sample("p", 1, plain_b, True), sample("p", 2, plain_c, True),
               sample("n", 0, "no math here\nThe answer is 10", True),
               sample("n", 1, "nothing either\nThe answer is 10", True)]
    ids = [r["meta"]["sample_id"] for r in build_rft_set(samples, dedupe="equations")]
    assert ids == ["g:0", "p:0", "p:2", "n:0", "n:1"]
    assert len(build_rft_set(samples, dedupe="text")) == 7


def test_levenshtein_matches_dynamic_programming():
    def dp(a, b):
        prev = list(range(len(b) + 1))
        for i, x in enumerate(a, 1):
            cur = [i]
            for j, y in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
            prev = cur
        return prev[-1]
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 90))]
        b = [rng.choice("abcd") for _ in range(rng.randint(0, 90))]
        assert levenshtein(a, b) == dp(a, b)


def test_outcome_pairs_pick_most_different_without_reuse():
    c1 = "a b c d e f\nThe answer is 10"
    near = "a b c d e f\nThe answer is 11"
    far = "z y x w v u t s\nThe answer is 12"
    samples = [sample("q", 0, c1, True), sample("q", 1, near, False), sample("q", 2, far, False),
               sample("q", 3, "a b c X e f\nThe answer is 10", True),
               sample("q", 4, "a b Y d e f\nThe answer is 10", True),
               sample("q", 5, far + " ", False),                     # duplicate wrong text
               sample("only_right", 0, c1, True)]
    pairs = build_outcome_pairs(samples, round_index=3)
    assert [(p["meta"]["chosen_id"], p["meta"]["rejected_id"]) for p in pairs] == [
        ("q:0", "q:2"),   # the most different wrong one
        ("q:3", "q:1"),   # q:2 is used: the other wrong one before any reuse
        ("q:4", "q:2"),   # all used once: start again, most different first
    ]
    assert pairs[0] == {"prompt": "Q?\n", "chosen": c1, "rejected": far, "rejected_ends": True,
                        "meta": {"question_id": "q", "source": "outcome", "chosen_id": "q:0",
                                 "rejected_id": "q:2", "round": 3}}
    by_id = {s["id"]: s for s in samples}
    for p in pairs:
        assert by_id[p["meta"]["chosen_id"]]["correct"] and not by_id[p["meta"]["rejected_id"]]["correct"]
        assert p["chosen"] != p["rejected"]
    two = build_outcome_pairs(samples, max_pairs_per_chosen=2)
    assert len(two) == 6 and len({p["rejected"] for p in two[:2]}) == 2


def test_samples_cut_at_max_new_tokens_are_never_chosen_and_end_nothing():
    right, cut_right = "a b\nThe answer is 10", "c d\nThe answer is 10\nThe answer is 10\nThe"
    samples = [{**sample("q", 0, cut_right, True), "finished": False}, sample("q", 1, right, True),
               {**sample("q", 2, "x y z z z z", False), "finished": False}, sample("q", 3, "w\nThe answer is 9", False),
               {**sample("cut_only", 0, cut_right, True), "finished": False}, sample("cut_only", 1, "v", False)]
    assert [r["meta"]["sample_id"] for r in build_rft_set(samples)] == ["q:1"]
    pairs = build_outcome_pairs(samples, max_pairs_per_chosen=2)
    assert [(p["meta"]["chosen_id"], p["meta"]["rejected_id"], p["rejected_ends"]) for p in pairs] == [
        ("q:1", "q:2", False), ("q:1", "q:3", True)]  # the cut one: no end token in DPO
    with pytest.raises(DataError, match="finished"):
        build_outcome_pairs([{**sample("q", 0, right, True), "finished": "yes"}])


def test_granular_pairs_respect_cut_samples_and_cut_completions():
    outs = [outcome(1, [(OK, True)]), outcome(2, [(OK, True)]), outcome(3, [(SHORT_OK, True)])]
    answer_pit = record(4, outcomes=outs)
    assert build_granular_pairs([answer_pit])[0]["rejected_ends"] is True
    # The same rationale cut at max_new_tokens: its last line is not an answer that ends it.
    (cut,) = build_granular_pairs([{**answer_pit, "rejected_ends": False}])
    assert cut["rejected_ends"] is False
    assert build_granular_pairs([{**answer_pit, "rejected_ends": False}], rejected_mode="pit_to_end")[0][
        "rejected_ends"] is False
    # A correct completion that was cut is not a whole response: the finished one is chosen.
    step2 = {**outcome(2, [(SHORT_OK, True), (OK, True)]), "finished": [False, True]}
    (pair,) = build_granular_pairs([record(3, outcomes=[outcome(1, [(OK, True)]), step2,
                                                        outcome(3, [(BAD, False)] * 4)])])
    assert pair["chosen"] == OK.strip()


def test_pit_agreement_places_pits_relative_to_the_first_wrong_step():
    recs = [record(2, sid="a"), record(3, sid="b"), record(4, sid="c"), record(3, sid="d"),
            record(None, status="no_pit", sid="e"), record(2, sid="f")]
    first_wrong = {"a": 2, "b": 2, "c": 4, "d": 4, "e": 1, "f": None}
    stats = pit_agreement(recs, lambda r: first_wrong[r["sample_id"]])
    assert stats == {"pits_checked": 4, "pit_at_first_error": 0.5, "pit_before_first_error": 0.25,
                     "pit_after_first_error": 0.25}
    assert pit_agreement(recs, lambda r: None) == {}


def test_sample_stats():
    samples = [sample("a", 0, "x", True), sample("a", 1, "y", False),
               sample("b", 0, "x", False), sample("b", 1, "y", False),
               sample("c", 0, "x", True), sample("c", 1, "x", True)]
    stats = sample_stats(samples, pairs=build_outcome_pairs(samples))
    assert stats["num_questions"] == 3 and stats["num_samples"] == 6 and stats["num_correct"] == 3
    assert stats["pass_rate"] == pytest.approx(0.5) and stats["pass_at_n"] == pytest.approx(2 / 3)
    assert stats["questions_no_correct"] == 1 and stats["questions_no_wrong"] == 1
    assert stats["num_pairs"] == 1


def test_builders_reject_malformed_samples():
    bad = sample("a", 0, "x", True)
    bad["correct"] = "yes"
    with pytest.raises(DataError, match="correct"):
        build_rft_set([bad])


# ------------------------------------------------------------------ stage

@dataclass(frozen=True)
class FakeProblem:
    question: str
    answer: str


class KilledSampler(RandomSampler):
    """Dies (like a killed process) on the first call after `shard_dir` holds a finished chunk."""

    def __init__(self, shard_dir) -> None:
        super().__init__()
        self.shard_dir = shard_dir

    def generate(self, *args, **kwargs):
        if list(self.shard_dir.glob("chunk_*.meta.json")):
            raise KeyboardInterrupt
        return super().generate(*args, **kwargs)


def write_pairs(path, num_questions=5, per_question=3):
    rng = random.Random(1)
    records = []
    for qi in range(num_questions):
        shared = [f"p={rng.choice([0.5, 0.7])} q{qi} base"]  # first step shared within a question
        for j in range(per_question):
            steps = shared + [f"p={rng.choice([0.2, 0.5, 0.8])} q{qi} s{j} t{t}" for t in range(3)]
            records.append({"prompt": f"Q{qi}?\n", "chosen": f"c{qi}\nThe answer is 10",
                            "rejected": "\n".join(steps + ["The answer is 3"]),
                            "meta": {"question_id": f"q{qi}", "source": "outcome", "chosen_id": f"q{qi}:c",
                                     "rejected_id": f"q{qi}:{j}", "round": 1}})
    records.append(dict(records[0]))  # the same rejected sample in a second pair: explored once
    write_jsonl(path, records)
    return {f"q{qi}": FakeProblem(f"Q{qi}?", "10") for qi in range(num_questions)}


@pytest.mark.parametrize("schedule", ["stream", "waves"])
def test_stage_resume_after_kill_equals_uninterrupted(tmp_path, schedule):
    problems = write_pairs(tmp_path / "pairs.jsonl")
    config = ExploreConfig(chunk_size=4, seed=11, schedule=schedule)
    full = RandomSampler()
    stats = run_explore_stage(full, TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "full", config)
    explore_full = (tmp_path / "full" / "explore.jsonl").read_text()
    gpairs_full = (tmp_path / "full" / "gpairs.jsonl").read_text()
    recs = read_jsonl(tmp_path / "full" / "explore.jsonl")
    assert len(recs) == 15 and len({r["sample_id"] for r in recs}) == 15
    assert stats["num_rationales"] == 15 and stats["num_pairs"] == len(read_jsonl(tmp_path / "full" / "gpairs.jsonl"))
    assert stats["tokens_generated"] == full.generated_tokens
    assert json.loads((tmp_path / "full" / "explore_stats.json").read_text()) == stats

    run = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        run_explore_stage(KilledSampler(run / "explore_shards"), TASK, tmp_path / "pairs.jsonl", problems, run, config)
    done = list((run / "explore_shards").glob("chunk_*.meta.json"))
    assert 0 < len(done) < 4 and not (run / "explore.jsonl").exists()
    resumed = RandomSampler()
    run_explore_stage(resumed, TASK, tmp_path / "pairs.jsonl", problems, run, config)
    assert (run / "explore.jsonl").read_text() == explore_full
    assert (run / "gpairs.jsonl").read_text() == gpairs_full
    assert 0 < sum(resumed.rows) < sum(full.rows)  # only the chunks the kill lost are drawn again

    again = RandomSampler()  # everything done: nothing is sampled again
    run_explore_stage(again, TASK, tmp_path / "pairs.jsonl", problems, run, config)
    assert again.calls == 0 and (run / "explore.jsonl").read_text() == explore_full

    changed = RandomSampler()  # other settings: refused, then (forced) stale shards are not reused
    with pytest.raises(ValueError, match="different config.*seed: 11 -> 12"):
        run_explore_stage(changed, TASK, tmp_path / "pairs.jsonl", problems, run, ExploreConfig(chunk_size=4, seed=12))
    assert changed.calls == 0 and (run / "explore.jsonl").read_text() == explore_full
    run_explore_stage(changed, TASK, tmp_path / "pairs.jsonl", problems, run, ExploreConfig(chunk_size=4, seed=12),
                      StageContext(force=True))
    assert changed.calls > 0


def test_stage_chunks_keep_questions_whole_and_share_prefixes(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl")
    sampler = RandomSampler()
    run_explore_stage(sampler, TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "out",
                      ExploreConfig(chunk_size=4, mode="exhaustive"))
    shards = sorted((tmp_path / "out" / "explore_shards").glob("chunk_*.jsonl"))
    questions = [{r["question_id"] for r in read_jsonl(s)} for s in shards]
    assert len(shards) == 3 and all(not (a & b) for a, b in zip(questions, questions[1:]))


def test_stage_reports_bad_pairs_file_precisely(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl", num_questions=1, per_question=1)
    with (tmp_path / "pairs.jsonl").open("a") as f:
        f.write(json.dumps({"prompt": "Q?\n", "chosen": "c", "rejected": "r",
                            "meta": {"question_id": "nope", "rejected_id": "x"}}) + "\n")
    with pytest.raises(DataError, match="line 3.*meta.question_id"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "o")
    (tmp_path / "p2.jsonl").write_text(json.dumps({"prompt": "Q", "rejected": "r", "chosen": "c"}) + "\n")
    with pytest.raises(DataError, match="line 1.*meta"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "p2.jsonl", problems, tmp_path / "o")
    bad_ends = {**read_jsonl(tmp_path / "pairs.jsonl")[0], "rejected_ends": "no"}
    write_jsonl(tmp_path / "p3.jsonl", [bad_ends])
    with pytest.raises(DataError, match="line 1.*rejected_ends"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "p3.jsonl", problems, tmp_path / "o")


def test_stage_carries_a_cut_rejected_sample_into_its_record(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl", num_questions=1, per_question=2)
    pairs = read_jsonl(tmp_path / "pairs.jsonl")[:2]
    write_jsonl(tmp_path / "pairs.jsonl", [pairs[0], {**pairs[1], "rejected_ends": False}])
    run_explore_stage(RandomSampler(), TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "out",
                      ExploreConfig(mode="exhaustive"))
    recs = read_jsonl(tmp_path / "out" / "explore.jsonl")
    assert [r["rejected_ends"] for r in recs] == [True, False]
    assert all(o["finished"] == [True] * len(o["completions"]) for r in recs for o in r["outcomes"])


def test_stage_refuses_changed_input_or_explorer_unless_forced_and_keeps_results(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    m1, m2, forced = StageContext(model="m1"), StageContext(model="m2"), StageContext(model="m1", force=True)
    run_explore_stage(RandomSampler(), TASK, tmp_path / "pairs.jsonl", problems, out, context=m1)
    finished = {name: (out / name).read_text() for name in ("explore.jsonl", "gpairs.jsonl", "explore_stats.json")}
    write_jsonl(tmp_path / "fewer.jsonl", read_jsonl(tmp_path / "pairs.jsonl")[:3])
    with pytest.raises(ValueError, match=r"different config.*num_rationales: 15 -> 3.*--force"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "fewer.jsonl", problems, out, context=m1)
    with pytest.raises(ValueError, match=r"different config.*model: 'm1' -> 'm2'"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "pairs.jsonl", problems, out, context=m2)
    for blank in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(blank)
        with pytest.raises(DataError, match=r"empty.jsonl: no pairs"):
            run_explore_stage(RandomSampler(), TASK, tmp_path / "empty.jsonl", problems, out, context=forced)
    assert {name: (out / name).read_text() for name in finished} == finished
    run_explore_stage(RandomSampler(), TASK, tmp_path / "fewer.jsonl", problems, out, context=forced)
    assert len(read_jsonl(out / "explore.jsonl")) == 3


def test_stage_refuses_pairs_made_from_other_problems(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl", num_questions=2, per_question=1)
    other = {"q0": FakeProblem("Q0?", "10"), "q1": FakeProblem("How many?", "7")}  # other task options
    with pytest.raises(DataError, match=r"pairs.jsonl, line 2, field 'prompt': not the prompt of problem 'q1'"
                                        r".*task options"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "pairs.jsonl", other, tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # A chat-template prompt holds the task prompt; the prompter that made the pairs must match exactly.
    chat = [{**r, "prompt": f"<|user|>{r['prompt'].strip()}<|end|>\n<|assistant|>\n"}
            for r in read_jsonl(tmp_path / "pairs.jsonl")]
    write_jsonl(tmp_path / "chat.jsonl", chat)
    run_explore_stage(RandomSampler(), TASK, tmp_path / "chat.jsonl", problems, tmp_path / "chat")
    with pytest.raises(DataError, match=r"chat.jsonl, line 1, field 'prompt'"):
        run_explore_stage(RandomSampler(), TASK, tmp_path / "chat.jsonl", problems, tmp_path / "raw",
                          context=StageContext(prompt=TASK.prompt))


class CharTokenizer:
    """One token per character (plus BOS), like a real tokenizer's call signature."""

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[0] * (len(t) + add_special_tokens) for t in texts]}


class ContextSampler(RandomSampler):
    """A backend-like sampler: a context, a tokenizer, and no completions for a prompt that does not
    fit (overlong_prompts="skip"); records every max_new_tokens it is asked for."""

    def __init__(self, context: int) -> None:
        super().__init__()
        self.context, self.tokenizer, self.budgets = context, CharTokenizer(), []

    def generate(self, prompts, n, draws, seed):
        self.budgets.append(draws.max_new_tokens)
        out = super().generate(prompts, n, draws, seed)
        return [[] if len(p) + 1 + draws.max_new_tokens > self.context else row for p, row in zip(prompts, out)]


def test_stage_caps_an_unset_max_new_tokens_to_the_explorer_context(tmp_path):
    problems = write_pairs(tmp_path / "pairs.jsonl")
    longest = max(len(r["prompt"] + r["rejected"] + "\n") + 1 for r in read_jsonl(tmp_path / "pairs.jsonl"))
    sampler = ContextSampler(context=longest + 40)
    stats = run_explore_stage(sampler, TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "out")
    assert set(sampler.budgets) == {40} and stats["num_rationales"] == 15
    assert not any(r["status"] == "skipped:no_completions" for r in read_jsonl(tmp_path / "out" / "explore.jsonl"))
    with pytest.raises(ValueError, match=r"longest prefix to explore has \d+ tokens.*context \(20 tokens\)"):
        run_explore_stage(ContextSampler(context=20), TASK, tmp_path / "pairs.jsonl", problems, tmp_path / "o2")


def test_stage_fails_loudly_when_most_rationales_get_no_completions(tmp_path, caplog):
    problems = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match=r"15 of 15 rationales got no completions.*context, 200 tokens.*"
                                           r"explore.max_new_tokens=512"):
        run_explore_stage(ContextSampler(context=200), TASK, tmp_path / "pairs.jsonl", problems, out,
                          ExploreConfig(max_new_tokens=512))
    assert not (out / "explore.jsonl").exists() and not (out / "gpairs.jsonl").exists()
    # A minority of overlong prompts is a warning, and the run completes.
    records = read_jsonl(tmp_path / "pairs.jsonl")
    long_q0 = [{**r, "prompt": r["prompt"] + "Q0? " * 60} if r["meta"]["question_id"] == "q0" else r for r in records]
    write_jsonl(tmp_path / "long.jsonl", long_q0)
    with caplog.at_level("WARNING", logger="selfexplore.explore.stage"):
        run_explore_stage(ContextSampler(context=200), TASK, tmp_path / "long.jsonl", problems, tmp_path / "o2",
                          ExploreConfig(max_new_tokens=64))
    assert "3 of 15 rationales got no completions" in caplog.text


class StopSampler(ScriptedSampler):
    """Cuts completions at the stop strings it is given, as both backends do, and records them."""

    def __init__(self, script):
        super().__init__(script)
        self.stops = []

    def generate(self, prompts, n, draws, seed):
        self.stops.append(draws.stop)
        out = super().generate(prompts, n, draws, seed)
        return [[truncate_at_stop(c, draws.stop) for c in row] for row in out]


def test_exploration_passes_stop_strings_so_a_run_on_is_not_a_false_pit():
    run_on = OK + "\nProblem: what is 3 + 4?\nThe answer is 7"  # right, then graded on the next problem
    script = {prefix(1): [run_on] * 4, prefix(2): [BAD] * 4}
    (rec,), sampler = explore([rationale()], sampler=StopSampler(script), mode="exhaustive", stop=["Problem:"])
    assert rec["pit"] == 2 and set(map(tuple, sampler.stops)) == {("Problem:",)}
    (rec,), _ = explore([rationale()], sampler=StopSampler(script), mode="exhaustive")
    assert rec["pit"] == 1  # without the stop string the run-on completion grades wrong
    assert ExploreConfig().inherit_stop(["Problem:"]).stop == ["Problem:"]
    assert ExploreConfig(stop=[]).inherit_stop(["Problem:"]).stop == []
