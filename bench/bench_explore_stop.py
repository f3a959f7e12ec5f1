"""Exploration with and without stop strings, on an explorer that runs on past its answer.

Real models often keep writing after "The answer is N": a new "Problem: ..." with its own
steps and answer. Without a stop string, such a completion is graded on the *last* answer, the
next problem's, so a correct continuation counts as wrong (a false pit, before the real first
wrong step) and every completion costs the run-on's tokens. The scripted explorer here continues
each step prefix with the gold steps (or, after a slip, with a wrong answer) and then runs on into
another problem; an engine with the stop string cuts it there. Prints one JSON line per setting:
generated tokens (words) per granular pair, false pits (pit before the slip) and pits found.

    python bench/bench_explore_stop.py
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

from _harness import bench_parser, emit, parse_args

from selfexplore.explore.config import ExploreConfig
from selfexplore.explore.stage import run_explore_stage
from selfexplore.io import read_jsonl, write_jsonl
from selfexplore.sampling.base import DrawParams, SamplerBase, Seeds, prompt_seed, truncate_at_stop
from selfexplore.tasks import get_task

TASK = get_task("arith", train_size=200, validation_size=8, test_size=8, min_steps=3, max_steps=5,
                max_operand=20, operations=["+", "-"])
STOP = ["\nProblem:"]


class RunOnExplorer(SamplerBase):
    """Gold continuation of an unslipped prefix (a wrong answer after a slip), then a run-on."""

    def __init__(self, problems: list) -> None:
        self.problems = problems
        self.by_prompt = {TASK.prompt(p): p for p in problems}
        self.generated_tokens = 0

    def generate(self, prompts: Sequence[str], n: int, draws: DrawParams, seed: Seeds) -> list[list[str]]:
        out = []
        for i, prompt in enumerate(prompts):
            question = next(q for q in self.by_prompt if prompt.startswith(q))
            problem, gold = self.by_prompt[question], self.by_prompt[question].solution.split("\n")
            done = [line for line in prompt[len(question):].split("\n") if line]
            slipped = any(line not in gold for line in done)
            rest = gold[len(done):]
            if slipped:
                rest = rest[:-1] + [f"The answer is {int(problem.answer) + 1}"]
            other = random.Random(str(prompt_seed(seed, i))).choice(self.problems)
            text = "\n".join(rest) + f"\nProblem: {other.question}\n{other.solution}"
            texts = [truncate_at_stop(text, draws.stop) for _ in range(n)]
            self.generated_tokens += sum(len(t.split()) for t in texts)
            out.append(texts)
        return out


def rejected_pairs(path: Path, problems: list) -> dict[str, int]:
    """One pair per problem: gold chosen, rejected = gold with a slip at a random step (kept per id)."""
    rng, pairs, slips = random.Random(0), [], {}
    for p in problems:
        steps = p.solution.split("\n")
        j = rng.choice([i for i, line in enumerate(steps) if " = " in line])  # a calculation line
        wrong = steps[:j] + [steps[j].rsplit(" ", 1)[0] + f" {int(steps[j].rsplit(' ', 1)[1]) + 1}"] + \
            [s for s in steps[j + 1:-1]] + [f"The answer is {int(p.answer) + 1}"]
        slips[f"{p.id}:0"] = j + 1  # 1-based step of the first wrong line: the true first pit
        pairs.append({"prompt": TASK.prompt(p), "chosen": p.solution, "rejected": "\n".join(wrong),
                      "meta": {"question_id": p.id, "rejected_id": f"{p.id}:0", "chosen_id": "gold"}})
    write_jsonl(path, pairs)
    return slips


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n\n")[0], repeats=None)
    parser.add_argument("--problems", type=int, default=100, help="rejected rationales explored (one per problem)")
    args = parse_args(parser, argv, smoke={"problems": 10})
    problems = TASK.load("train")[:args.problems]
    with tempfile.TemporaryDirectory() as tmp:
        slips = rejected_pairs(Path(tmp) / "pairs.jsonl", problems)
        for label, stop in (("no stop strings (before)", []), ("stop strings (after)", STOP)):
            explorer = RunOnExplorer(problems)
            out = Path(tmp) / label.split()[0]
            stats = run_explore_stage(explorer, TASK, Path(tmp) / "pairs.jsonl", {p.id: p for p in problems}, out,
                                      ExploreConfig(k=4, max_new_tokens=256, mode="exhaustive", stop=stop))
            records = read_jsonl(out / "explore.jsonl")
            pits = [r for r in records if r.get("pit") is not None]
            false = sum(r["pit"] < slips[r["sample_id"]] for r in pits)
            emit(bench="explore_stop", setting=label, stop=stop, rationales=len(records), pits=len(pits),
                 false_pits=false, granular_pairs=stats["num_pairs"], generated_words=explorer.generated_tokens,
                 words_per_granular_pair=round(explorer.generated_tokens / max(1, stats["num_pairs"]), 1))


if __name__ == "__main__":
    main()
