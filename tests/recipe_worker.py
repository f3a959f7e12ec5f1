"""Run recipes through the `selfexplore` CLI and record every DPO loss's first call (the step-0 invariant).

    python tests/recipe_worker.py OUT COMMAND CONFIG [COMMAND CONFIG ...]

Run by tests/test_recipes_as_written.py in the test process (QLoRA, one process) or as a
command (FSDP2 recipes: Lightning reruns this command for rank 1, so the recorder is installed
on every rank, and several recipes share one pair of processes). Each fit's first call of
`dpo_loss` is written to OUT/step0-rank{r}.jsonl: the mean loss, the mean reward margin and the
dtype the policy's log-probs came in. `pipeline` configs are run with `scripted_texts`: the
vLLM engine really generates, and the texts the units grade are replaced by scripted ones
(an untrained tiny model writes nothing gradable; tests must not rest on what it writes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from pathlib import Path
from typing import Any


def record_step0(out: Path) -> None:
    """Patch `StepDPOModule`'s loss so the first call of each fit is written to OUT (per rank)."""
    import torch

    import selfexplore.training.dpo as dpo

    loss_fn = dpo.dpo_loss
    seen: set[int] = set()

    def recording(chosen, rejected, ref_chosen, ref_rejected, *args, **kwargs):
        losses, chosen_rewards, rejected_rewards = loss_fn(chosen, rejected, ref_chosen, ref_rejected, *args, **kwargs)
        fit = _current_fit()
        if fit not in seen:
            seen.add(fit)
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            row = {"fit": fit, "loss": float(losses.float().mean()),
                   "margin": float((chosen_rewards - rejected_rewards).float().mean()),
                   "max_abs_margin": float((chosen_rewards - rejected_rewards).float().abs().max()),
                   "policy_dtype": str(chosen.dtype), "reference_dtype": str(ref_chosen.dtype),
                   "autocast": torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")}
            out.mkdir(parents=True, exist_ok=True)
            with (out / f"step0-rank{rank}.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        return losses, chosen_rewards, rejected_rewards

    dpo.dpo_loss = recording


_FITS = {"count": 0}


def _current_fit() -> int:
    return _FITS["count"]


def count_fits() -> None:
    """Number the Trainer.fit calls, so each fit's first loss is recorded once."""
    from lightning.pytorch import Trainer

    fit = Trainer.fit

    def counted(self, *args, **kwargs):
        _FITS["count"] += 1
        return fit(self, *args, **kwargs)

    Trainer.fit = counted


def scripted_texts(wrong_rate: float = 0.4) -> None:
    """vLLM (or HF) really generates; each completion is then replaced by the gold continuation of
    the prompt, its final answer off by one with probability `wrong_rate` (seeded by prompt and seed),
    or always once an earlier step of the prompt already slipped."""
    from selfexplore.completion import Completion
    from selfexplore.sampling import vllm_backend
    from selfexplore.tasks import get_task

    generate = vllm_backend.VLLMSampler.generate
    golds: dict[str, Any] = {}

    def problems(task: str, data_dir: str) -> dict[str, Any]:
        if task not in golds:
            t = get_task(task)
            golds[task] = (t, {t.prompt(p): p for s in ("train", "test")
                               for p in t.load(s, path=f"{data_dir}/{s}.jsonl")})
        return golds[task]

    def continuation(prompt: str, key: str) -> str:
        for task, data_dir in (("gsm8k", "data/gsm8k"), ("math", "data/math")):
            if not Path(data_dir).is_dir():
                continue
            t, by_prompt = problems(task, data_dir)
            question = next((q for q in by_prompt if prompt.startswith(q)), None)
            if question is None:
                continue
            p = by_prompt[question]
            done = prompt[len(question):]
            rng = random.Random(int(hashlib.sha256(key.encode()).hexdigest()[:12], 16))
            if p.solution.startswith(done) and rng.random() >= wrong_rate:
                return p.solution[len(done):]
            rest = p.solution[len(done):] if p.solution.startswith(done) else p.solution.rsplit("\n", 1)[-1]
            head, _, tail = rest.rpartition(str(p.answer))
            return f"{head}{int(p.answer) + 1}{tail}" if head or tail else rest
        raise KeyError(f"no scripted continuation for prompt {prompt[:60]!r}")

    def scripted(self, prompts, n, draws, seed):
        generated = generate(self, prompts, n=n, draws=draws, seed=seed)  # the engine really runs
        out = []
        for i, (prompt, completions) in enumerate(zip(prompts, generated)):
            s = seed[i] if isinstance(seed, (list, tuple)) else seed
            texts = [continuation(prompt, f"{prompt}|{s}|{j}|{draws.temperature}") for j in range(len(completions))]
            out.append([Completion(t, True, getattr(c, "tokens", None)) for c, t in zip(completions, texts)])
        return out

    vllm_backend.VLLMSampler.generate = scripted
    vllm_backend.VLLMSampler.open_stream = None  # the scripted texts go through generate (explore's fallback)


def main(argv: list[str]) -> None:
    import torch

    from selfexplore.cli import main as cli

    out, pairs = Path(argv[0]), argv[1:]
    torch.set_num_threads(1)
    record_step0(out)
    count_fits()
    for command, config in zip(pairs[::2], pairs[1::2]):
        if command == "pipeline":
            scripted_texts()
        cli([command, "--config", config])


if __name__ == "__main__":
    main(sys.argv[1:])
