"""Bench: adaptive vs exhaustive first-pit search on a tiny arith model.

Question: does the adaptive search (waves, early stop, shared prefixes) cost fewer generated
tokens per granular pair than the paper's exhaustive search, while finding pits with the same
distribution? Steps: build a tiny Llama with a tokenizer trained on arith texts, train it
briefly on gold rationales (a plain torch loop, so the bench does not depend on the training
stack), sample rationales, build outcome pairs, then explore the same rejected rationales in
both modes with several seeds. Prints one JSON line per result: per mode the tokens, pits,
pairs and pit histogram; then the token ratio and a permutation test of "same pit
distribution" (chi-square statistic on the pit-step histogram, no-pit as its own bin).

    OMP_NUM_THREADS=2 python bench/bench_explore.py --work-dir runs/bench_explore
    (training dominates: 5-20 minutes on 2 busy CPU cores; a rerun with the same --work-dir
    reuses the trained model)
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from _harness import bench_parser, emit, parse_args, slipped_answer

from selfexplore.explore import ExploreConfig, build_granular_pairs, build_outcome_pairs, find_first_pits
from selfexplore.explore.pit import Rationale
from selfexplore.models import ModelSpec, build_tiny_llama, load_model, load_tokenizer
from selfexplore.models.tiny import tiny_shape
from selfexplore.sampling import DrawParams, HFSampler
from selfexplore.tasks import get_task

SMOKE = {"train_size": 40, "epochs": 1, "questions": 6, "samples": 2, "rationales": 6, "repeats": 1,
         "max_new_tokens": 16, "permutations": 20, "scripted_samples": True}


def train(model: torch.nn.Module, tokenizer, texts: list[str], epochs: int, lr: float, batch: int, seed: int) -> float:
    """Causal-LM loss on whole texts (+EOS); returns the last epoch's mean loss."""
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(encoded) + batch - 1) // batch)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1.0 - s / steps))
    rng = random.Random(seed)
    model.train()
    loss_sum = 0.0
    for _ in range(epochs):
        order = list(range(len(encoded)))
        rng.shuffle(order)
        loss_sum, count = 0.0, 0
        for start in range(0, len(order), batch):
            rows = [encoded[i] for i in order[start:start + batch]]
            width = max(map(len, rows))
            ids = torch.full((len(rows), width), tokenizer.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            for r, row in enumerate(rows):
                ids[r, :len(row)] = torch.tensor(row)
                labels[r, :len(row)] = torch.tensor(row)
            loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            loss_sum, count = loss_sum + loss.item(), count + 1
        loss_sum /= count
    model.eval()
    return loss_sum


def histogram(records: list[dict]) -> Counter:
    return Counter(r["pit"] if r["status"] == "pit" else "none" for r in records if r["status"] in ("pit", "no_pit"))


def chi2(a: Counter, b: Counter) -> float:
    """Two-sample chi-square statistic of two histograms (counts scaled to equal totals)."""
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for key in set(a) | set(b):
        x, y = a[key] * (nb / na) ** 0.5, b[key] * (na / nb) ** 0.5
        stat += (x - y) ** 2 / (a[key] + b[key])
    return stat


def permutation_test(a: list, b: list, permutations: int, seed: int) -> tuple[float, float]:
    """Chi-square statistic and its permutation p-value under 'both samples share one law'."""
    observed = chi2(Counter(a), Counter(b))
    pooled, rng, hits = a + b, random.Random(seed), 0
    for _ in range(permutations):
        rng.shuffle(pooled)
        hits += chi2(Counter(pooled[:len(a)]), Counter(pooled[len(a):])) >= observed - 1e-12
    return observed, (hits + 1) / (permutations + 1)


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (head_dim 32)")
    parser.add_argument("--arith", type=json.loads, help="arith task knobs as JSON",
                        default={"min_steps": 2, "max_steps": 4, "operations": ["+", "-"],
                                 "max_operand": 20, "max_value": 60})
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--questions", type=int, default=120, help="train questions sampled")
    parser.add_argument("--samples", type=int, default=8, help="rationales per question")
    parser.add_argument("--rationales", type=int, default=120, help="rejected rationales explored")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--permutations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--policy", type=Path, default=None,
                        help="explore with this trained HF folder (e.g. a quickstart run's round_1/rft/policy, "
                             "with --arith set to that run's task_options) instead of training a model here")
    parser.add_argument("--scripted-samples", action="store_true",
                        help="instead of sampling, take each question's gold solution and the gold with a wrong "
                             "final answer as its samples, so an untrained model still has rationales to explore")
    args = parse_args(parser, argv, smoke=SMOKE)
    torch.manual_seed(args.seed)

    # --arith wins: a run's own task_options (train_size included) must reproduce its questions
    task = get_task("arith", **{"train_size": args.train_size, "validation_size": 50, "test_size": 50,
                                "seed": args.seed, **args.arith})
    problems = task.load("train")
    texts = [task.prompt(p) + p.solution for p in problems]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        trained = work / "trained"
        t0 = time.perf_counter()
        reuse = args.policy or trained  # a given policy, or the model of an earlier run with this --work-dir
        if (reuse / "config.json").is_file():
            model = load_model(ModelSpec(path=str(reuse), dtype="float32"), for_training=False)
            tokenizer = load_tokenizer(reuse)
            emit(result="train", reused=str(reuse))
        else:
            heads = args.hidden // 32
            model_dir = build_tiny_llama(texts, work / "model", tiny_shape(
                "test", hidden_size=args.hidden, num_heads=heads, num_kv_heads=heads,
                intermediate_size=args.hidden * 11 // 4, vocab_size=512, max_position_embeddings=512))
            model = load_model(ModelSpec(path=str(model_dir), dtype="float32"), for_training=True)
            tokenizer = load_tokenizer(model_dir)
            loss = train(model, tokenizer, texts, args.epochs, args.lr, 32, args.seed)
            model.save_pretrained(trained)
            tokenizer.save_pretrained(trained)
            emit(result="train", loss=round(loss, 4), problems=len(problems),
                 params=sum(p.numel() for p in model.parameters()), seconds=round(time.perf_counter() - t0, 1))

        sampler = HFSampler(model, tokenizer, batch_size=128)
        subset = problems[:args.questions]
        t0 = time.perf_counter()
        prompts = [task.prompt(p) for p in subset]
        completions = sampler.generate(prompts, n=args.samples, draws=DrawParams(0.7, 1.0, args.max_new_tokens),
                                       seed=args.seed)
        if args.scripted_samples:
            completions = [[p.solution, slipped_answer(p)] for p in subset]
        samples = [{"id": f"{p.id}:{k}", "question_id": p.id, "prompt": prompt, "completion": c,
                    "answer": task.extract_answer(c), "gold": p.answer, "correct": task.is_correct(c, p.answer),
                    "backend": "hf", "seed": args.seed}
                   for p, prompt, cs in zip(subset, prompts, completions) for k, c in enumerate(cs)]
        pairs = build_outcome_pairs(samples)
        gold = {p.id: p.answer for p in subset}
        seen: set[str] = set()
        rationales = []
        for pair in pairs:
            meta = pair["meta"]
            if meta["rejected_id"] not in seen:
                seen.add(meta["rejected_id"])
                rationales.append(Rationale(meta["rejected_id"], meta["question_id"], pair["prompt"],
                                            gold[meta["question_id"]], pair["rejected"], pair["chosen"]))
        rationales = rationales[:args.rationales]
        emit(result="samples", questions=len(subset), samples=len(samples),
             accuracy=round(sum(s["correct"] for s in samples) / len(samples), 4),
             outcome_pairs=len(pairs), rationales=len(rationales),
             seconds=round(time.perf_counter() - t0, 1))
        if not rationales:
            raise SystemExit("no rejected rationale with a correct partner: train longer (--epochs)")

        pits: dict[str, list] = {}
        totals: dict[str, dict[str, float]] = {}
        for mode in ("exhaustive", "adaptive"):
            pits[mode], tot, by_step, at_step = [], Counter(), Counter(), Counter()
            for rep in range(args.repeats):
                config = ExploreConfig(mode=mode, seed=1000 + rep, max_new_tokens=args.max_new_tokens)
                before, t0 = sampler.generated_tokens, time.perf_counter()
                records = find_first_pits(rationales, sampler, task, config)
                gpairs = build_granular_pairs(records)
                run = {"tokens": sampler.generated_tokens - before, "pairs": len(gpairs),
                       "pits": sum(r["status"] == "pit" for r in records), "seconds": time.perf_counter() - t0}
                tot.update(run)
                for r in records:
                    if r["status"] == "pit":
                        by_step[r["pit"]] += r["tokens_generated"]
                        at_step[r["pit"]] += 1
                hist = histogram(records)
                pits[mode] += list(hist.elements())
                emit(result="explore", mode=mode, repeat=rep, tokens=run["tokens"], pits=run["pits"],
                     granular_pairs=run["pairs"], histogram={str(k): v for k, v in sorted(hist.items(), key=str)},
                     skipped=sum(r["status"].startswith("skipped") for r in records),
                     seconds=round(run["seconds"], 1))
            totals[mode] = dict(tot)
            emit(result="mode", mode=mode, tokens=tot["tokens"], pits=tot["pits"], granular_pairs=tot["pairs"],
                 tokens_per_pair=round(tot["tokens"] / max(tot["pairs"], 1), 1),
                 tokens_per_pit=round(tot["tokens"] / max(tot["pits"], 1), 1),
                 tokens_per_rationale_by_pit_step={str(t): round(by_step[t] / at_step[t], 1) for t in sorted(at_step)},
                 seconds=round(tot["seconds"], 1),
                 seconds_per_100_rationales=round(100 * tot["seconds"] / (args.repeats * len(rationales)), 1))
        stat, p_value = permutation_test(pits["adaptive"], pits["exhaustive"], args.permutations, args.seed)
        ex, ad = totals["exhaustive"], totals["adaptive"]
        def per(totals: dict[str, float], key: str) -> float:
            return totals["tokens"] / max(totals[key], 1)

        emit(result="comparison",
             token_ratio=round(ex["tokens"] / max(ad["tokens"], 1), 3),
             tokens_per_pair_ratio=round(per(ex, "pairs") / max(per(ad, "pairs"), 1e-9), 3),
             tokens_per_pit_ratio=round(per(ex, "pits") / max(per(ad, "pits"), 1e-9), 3),
             pit_chi2=round(stat, 3), pit_permutation_p=round(p_value, 4),
             histogram_exhaustive={str(k): v for k, v in sorted(Counter(pits["exhaustive"]).items(), key=str)},
             histogram_adaptive={str(k): v for k, v in sorted(Counter(pits["adaptive"]).items(), key=str)})


if __name__ == "__main__":
    main()
