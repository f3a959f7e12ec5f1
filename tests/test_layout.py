"""RunLayout: every path of a run directory, and recorded paths relative to it."""

from __future__ import annotations

from pathlib import Path

from selfexplore.pipeline.layout import RunLayout


def test_paths_of_a_run() -> None:
    layout = RunLayout("runs/q")
    assert layout.root == Path("runs/q") and layout == RunLayout(Path("runs/q"))
    assert (layout.state, layout.config, layout.report_md, layout.report_png) == tuple(
        Path("runs/q") / name for name in ("state.json", "config.json", "report.md", "report.png"))
    assert layout.samples() == Path("runs/q/round_1/samples.jsonl")
    assert layout.rft() == Path("runs/q/round_1/rft.jsonl")
    assert layout.explorer_samples(2) == Path("runs/q/round_2/explorer_samples.jsonl")
    assert layout.pairs(2) == Path("runs/q/round_2/pairs.jsonl")
    assert layout.gpairs(2) == Path("runs/q/round_2/explore/gpairs.jsonl")
    assert layout.policy("round_2/self_explore") == Path("runs/q/round_2/self_explore/policy")
    assert layout.greedy_eval("round_0/sft") == Path("runs/q/round_0/sft/eval.jsonl")
    assert layout.eval_sampled("round_0/sft") == Path("runs/q/round_0/sft/eval_sampled.jsonl")
    assert (layout.cache, layout.reference_cache, layout.logs, layout.base) == tuple(
        Path("runs/q") / name for name in ("cache", "reference_cache", "logs", "base"))


def test_recorded_paths_are_relative_to_the_run(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path / "run")
    recorded = layout.relative(layout.policy("round_0/sft"))
    assert recorded == "round_0/sft/policy"
    assert RunLayout(tmp_path / "moved").resolve(recorded) == tmp_path / "moved" / "round_0/sft/policy"
    assert layout.relative("/elsewhere/model") == "/elsewhere/model"
    assert layout.resolve("/elsewhere/model") == Path("/elsewhere/model")
    # a folder outside the run given relative to the working directory is never joined onto the run
    outside = layout.relative("models/tiny")
    assert Path(outside).is_absolute() and layout.resolve(outside) == Path("models/tiny").absolute()
