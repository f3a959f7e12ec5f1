"""Bench: how far the model vLLM samples (the bf16/fp32 merge) is from the one QLoRA trains (nf4 base + adapter).

    python bench/bench_qlora_fidelity.py        # about a minute on CPU (bitsandbytes' CPU kernels)

A QLoRA policy trains on the nf4-quantized base plus its adapter, but the export merges the
adapter into the full-precision base (`selfexplore.models.export`), which is what the samplers
load. Texts sampled from the merged model are scored under both; printed per token: the mean
and max |log p_nf4 - log p_merged|, the mean difference, and the mean KL(merged || nf4) of the
next-token distributions over the scored positions. Model: a tiny Llama built on arith texts
(hidden 128, 4 layers, MLP 384: bitsandbytes CPU kernels need multiples of 64), untrained,
with a LoRA adapter (r 16, all linear) whose B matrices are set to seeded noise of the size a
short fine-tune reaches, so the adapter is not a no-op.
One JSON line per figure, medians over `--seeds` adapters.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from _harness import bench_parser, build_arith_model, emit, median, parse_args

# selfexplore.models.tiny.TINY_SHAPES["small"], MLP 384: bitsandbytes' CPU kernels need multiples of 64
SHAPE, SHAPE_OVERRIDES = "small", {"intermediate_size": 384}


def token_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position next-token log-softmax [N, L-1, V] and the scored tokens' log-probs [N, L-1]."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    return logp, logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def measure(seed: int, base: Path, work: Path, samples: int) -> dict[str, float]:
    from selfexplore.data.batching import pad_right
    from selfexplore.models import LoraSpec, ModelSpec, export_policy, load_model, load_tokenizer
    from selfexplore.sampling.base import DrawParams
    from selfexplore.sampling.hf import HFSampler
    from selfexplore.tasks import get_task

    tokenizer = load_tokenizer(str(base))
    spec = ModelSpec(path=str(base), quantization="nf4", lora=LoraSpec(r=16, alpha=32, dropout=0.0))
    qlora = load_model(spec, for_training=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    merged_dir = export_policy(qlora, tokenizer, work / f"merged_{seed}")
    merged = load_model(ModelSpec(path=str(merged_dir)), for_training=False)
    task = get_task("arith", train_size=50, validation_size=8, test_size=8)
    prompts = [task.prompt(p) for p in task.load("validation")]
    texts = HFSampler(merged, tokenizer, batch_size=64).generate(
        prompts, n=samples, draws=DrawParams(1.0, 1.0, 48), seed=seed)
    rows, scored = [], []
    for prompt, completions in zip(prompts, texts):
        prompt_ids = tokenizer(prompt).input_ids
        for c in completions:
            completion_ids = tokenizer(str(c), add_special_tokens=False).input_ids
            rows.append(prompt_ids + completion_ids)
            scored.append([0] * len(prompt_ids) + [1] * len(completion_ids))
    ids = pad_right(rows, tokenizer.pad_token_id)
    attention = pad_right([[1] * len(r) for r in rows], 0)
    score = pad_right(scored, 0)[:, 1:].bool()
    merged_dist, merged_tok = token_logps(merged, ids, attention)
    nf4_dist, nf4_tok = token_logps(qlora, ids, attention)
    diff = (nf4_tok - merged_tok)[score]
    kl = (merged_dist.exp() * (merged_dist - nf4_dist)).sum(-1)[score]
    return {"mean_abs_logp_diff_per_token": float(diff.abs().mean()), "max_abs_logp_diff": float(diff.abs().max()),
            "mean_logp_diff_per_token": float(diff.mean()), "mean_kl_per_token": float(kl.mean()),
            "mean_merged_logp_per_token": float(merged_tok[score].mean()), "tokens": int(score.sum())}


def main(argv: Sequence[str] | None = None) -> None:
    parser = bench_parser(__doc__, repeats=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt (8 prompts)")
    parser.add_argument("--train-size", type=int, default=400, help="arith problems the tokenizer learns from")
    args = parse_args(parser, argv, smoke={"seeds": 1, "samples": 1, "train_size": 50})
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        task = {"train_size": args.train_size, "validation_size": 8, "test_size": 8}
        base = build_arith_model(work / "base", SHAPE, task, **SHAPE_OVERRIDES)
        runs = [measure(seed, base, work, args.samples) for seed in range(args.seeds)]
    for key in runs[0]:
        emit(bench="qlora_fidelity", figure=key, median=median(r[key] for r in runs), per_seed=[r[key] for r in runs])


if __name__ == "__main__":
    main()
