"""A model card (`README.md`) in every exported `policy/` folder, so a policy can be shared as is.

The card is what the Hugging Face hub reads: YAML front matter (library_name, base_model when
the base is a hub model, tags, datasets, pipeline_tag) and a body with the recipe that made
the policy, its data and round, and the report's figures for it. Cards are (re)written with
the report, when every figure they show is known.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from selfexplore.io import atomic_write_text

# Hub datasets of the built-in tasks (arith is generated locally: none).
HUB_DATASETS = {"gsm8k": "openai/gsm8k", "math": "hendrycks/competition_math"}
STAGE_TAGS = {"SFT": ["sft"], "RFT": ["rft", "rejection-sampling"], "Outcome DPO": ["dpo"],
              "Self-Explore": ["dpo", "step-level-dpo", "self-explore"]}


def _hub_base(config: Any) -> str | None:
    """The base model as a hub id, when it is one (not built from scratch, a local folder or a GGUF spec)."""
    path = config.model.path
    if config.from_scratch is not None or path.startswith("gguf:") or Path(path).exists() or path.count("/") != 1:
        return None
    return path


def _recipe(row: dict[str, Any], config: Any) -> list[str]:
    """What trained this policy: its stage, start, data, and that stage's settings as configured."""
    stage = row["stage"]
    if stage in ("SFT", "RFT"):
        start = "the base model" if stage == "SFT" or config.rft_init == "base" else "the SFT policy"
        data = ("gold rationales" if stage == "SFT" else
                f"its own correct samples (up to {config.rft_max_per_question} per question)"
                + (" plus the gold rationales" if config.rft_include_gold else ""))
        key = stage.lower()
    else:
        start = "the policy it builds on"
        data = ("outcome pairs (a correct and a wrong sample of one question)" if stage == "Outcome DPO" else
                f"granular pairs from first-pit exploration (k={config.explore.k}, {config.explore.mode} mode) "
                f"of round {row['round']}; reference: the RFT policy"
                + ("" if config.reference_update == "keep" else ", updated each round"))
        key = "dpo"
    settings = yaml.safe_dump({key: asdict(getattr(config, key))}, sort_keys=False).strip()
    return [f"{stage} from {start} on {data}. Settings (`pipeline.{key}`):", "", "```yaml", settings, "```"]


def _figures(row: dict[str, Any]) -> list[str]:
    cells = [("greedy accuracy", row["accuracy"]), ("sampled accuracy", row["sampled_accuracy"]),
             ("change vs the policy it builds on", row.get("change")), ("pass@n of its samples", row["pass_at_n"]),
             ("training pairs", row["pairs"]), ("first-pit steps", row["pits"]),
             ("training seconds", row["seconds"])]
    lines = ["| figure | value |", "|---|---|"]
    for name, value in cells:
        if value is not None:
            text = (f"{value:.3f}" if isinstance(value, float) else
                    " ".join(f"{k}:{v}" for k, v in value.items()) if isinstance(value, dict) else str(value))
            lines.append(f"| {name} | {text} |")
    return lines


def model_card(row: dict[str, Any], config: Any, run_name: str) -> str:
    """README.md for the policy of one report row."""
    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                            "tags": ["selfexplore", "math-reasoning", *STAGE_TAGS[row["stage"]]]}
    if base := _hub_base(config):
        meta["base_model"] = base
    if config.task in HUB_DATASETS:
        meta["datasets"] = [HUB_DATASETS[config.task]]
    title = f"{row['stage']}" + (f" round {row['round']}" if row["stage"] == "Self-Explore" else "")
    base_text = (f"a tiny Llama built from scratch ({config.from_scratch.hidden_size} hidden, "
                 f"{config.from_scratch.num_layers} layers)" if config.from_scratch is not None else
                 f"`{config.model.path}`")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run_name}: {title}", "",
             f"A policy trained with [Self-Explore](https://arxiv.org/abs/2404.10346) (selfexplore), run "
             f"`{run_name}`, unit `{row['unit']}` (round {row['round']}). Base model: {base_text}.", "",
             "## Recipe", "", *_recipe(row, config), "",
             "## Data", "",
             f"- task `{config.task}`; evaluated greedily on its `{config.eval_split}` split"
             + (f" (first {config.eval_limit} questions)" if config.eval_limit else ""),
             f"- prompts: {'the chat template' if config.prompt_format.chat_template else 'raw `question` prompts'}"
             " (use the same at inference)", "",
             "## Results", "", *_figures(row), "",
             "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained(PATH)",
             "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", ""]
    return "\n".join(lines)


def write_model_cards(run_dir: str | Path, rows: list[dict[str, Any]], config: Any) -> list[Path]:
    """README.md in the policy folder of every report row that has one; returns their paths."""
    written = []
    for row in rows:
        policy = Path(run_dir) / row["unit"] / "policy"
        if policy.is_dir():
            atomic_write_text(policy / "README.md", model_card(row, config, Path(run_dir).name))
            written.append(policy / "README.md")
    return written
