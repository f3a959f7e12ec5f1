"""The stage commands (`selfexplore pairs`, `selfexplore explore`) through `selfexplore.cli.main`.

Inputs are hand-written files; the explore command's sampler and stage are replaced by
recorders, so these tests check what reaches the stage, never what a model writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import selfexplore.cli as cli
from selfexplore.explore.config import ExploreConfig
from selfexplore.sampling import SamplerBase


def _sample(qid: str, k: int, correct: bool, **fields) -> dict:
    completion = "1 + 1 = 2\nThe answer is 2" if correct else "1 + 1 = 3\nThe answer is 3"
    return {"id": f"{qid}:{k}", "question_id": qid, "prompt": f"{qid}?\n", "completion": completion,
            "correct": correct, "finished": True} | fields


def _write(path: Path, records: list) -> Path:
    lines = [json.dumps(r) if isinstance(r, dict) else r for r in records]
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.fixture
def finished_pairs_dir(tmp_path: Path) -> Path:
    """An out_dir holding the outputs of an earlier `pairs` run."""
    out = tmp_path / "out"
    samples = _write(tmp_path / "good.jsonl", [_sample("q1", 0, True), _sample("q1", 1, False)])
    cli.main(["pairs", "--samples", str(samples), "--out_dir", str(out)])
    assert (out / "pairs.jsonl").read_text().strip()
    return out


def _outputs(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("rft.jsonl", "pairs.jsonl", "sample_stats.json")}


@pytest.mark.parametrize("content", ["", "\n   \n"])
def test_pairs_refuses_an_empty_samples_file_and_keeps_earlier_outputs(finished_pairs_dir, tmp_path, content):
    before = _outputs(finished_pairs_dir)
    (tmp_path / "empty.jsonl").write_text(content)
    with pytest.raises(SystemExit, match=r"^selfexplore pairs: DataError: .*empty.jsonl: no samples"):  # one line
        cli.main(["pairs", "--samples", str(tmp_path / "empty.jsonl"), "--out_dir", str(finished_pairs_dir)])
    assert _outputs(finished_pairs_dir) == before


@pytest.mark.parametrize(("bad", "field"), [({"correct": "yes"}, "correct"), ({"question_id": ""}, "question_id"),
                                            ({"prompt": "  "}, "prompt"), ({"id": 3}, "id")])
def test_pairs_errors_name_file_line_and_field(finished_pairs_dir, tmp_path, bad, field):
    before = _outputs(finished_pairs_dir)
    records = [_sample(f"q{i}", 0, i % 2 == 0) for i in range(5)] + [_sample("q9", 0, True) | bad]
    samples = _write(tmp_path / "samples.jsonl", records[:3] + [""] + records[3:])  # a blank line: record 6 on line 7
    with pytest.raises(SystemExit, match=rf"DataError: .*samples.jsonl, line 7, field '{field}'"):
        cli.main(["pairs", "--samples", str(samples), "--out_dir", str(finished_pairs_dir)])
    assert _outputs(finished_pairs_dir) == before


def test_a_deeply_nested_json_line_is_a_located_error(tmp_path):
    samples = _write(tmp_path / "samples.jsonl", [_sample("q1", 0, True), '{"a": ' + "[" * 100000 + "]" * 100000 + "}"])
    with pytest.raises(SystemExit, match=r"DataError: .*samples.jsonl, line 2: JSON nested too deeply"):
        cli.main(["pairs", "--samples", str(samples), "--out_dir", str(tmp_path / "out")])


class _Recorder(SamplerBase):
    """Stands in for the sampler and the explore stage: records what the command passed."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.closed = False

    def get_sampler(self, config, model_path, *args, **kwargs):
        self.calls.append({"sampling": config, "explorer": model_path})
        return self

    def close(self) -> None:
        self.closed = True

    def run_explore_stage(self, sampler, task, pairs_path, problems_by_id, out_dir, config, context):
        self.calls.append({"config": config, "pairs": str(pairs_path), "model": context.model, "force": context.force})
        return {"num_pairs": 0}


@pytest.fixture
def recorder(monkeypatch) -> _Recorder:
    rec = _Recorder()
    monkeypatch.setattr(cli, "get_sampler", rec.get_sampler)
    monkeypatch.setattr(cli, "run_explore_stage", rec.run_explore_stage)
    return rec


def _explore(tmp_path: Path, *options: str) -> None:
    cli.main(["explore", "--explorer", "EXPLORER", "--pairs", str(tmp_path / "pairs.jsonl"),
              "--out_dir", str(tmp_path / "x"), "--task_options", '{"train_size": 4}', *options])


def test_explore_options_reach_the_stage(recorder, tmp_path):
    (tmp_path / "explore.yaml").write_text("mode: exhaustive\nk: 2\nmax_new_tokens: 64\n")
    for options in (["--explore.mode", "exhaustive", "--explore.k", "2", "--explore.max_new_tokens", "64"],
                    ["--explore", '{"mode": "exhaustive", "k": 2, "max_new_tokens": 64}'],
                    ["--explore", str(tmp_path / "explore.yaml")]):
        recorder.calls.clear()
        _explore(tmp_path, *options)
        config = recorder.calls[-1]["config"]
        assert (config.mode, config.k, config.max_new_tokens) == ("exhaustive", 2, 64), options
        assert recorder.calls[-1]["model"] == "EXPLORER" and recorder.calls[-1]["force"] is False
        assert recorder.closed


def test_explore_stop_defaults_to_the_sampling_stop_and_force_reaches_the_stage(recorder, tmp_path):
    _explore(tmp_path, "--sampling.stop", '["Problem:"]', "--force", "true")
    assert recorder.calls[-1]["config"].stop == ["Problem:"] and recorder.calls[-1]["force"] is True
    _explore(tmp_path, "--sampling.stop", '["Problem:"]', "--explore.stop", "[]")
    assert recorder.calls[-1]["config"].stop == []
    _explore(tmp_path)
    assert recorder.calls[-1]["config"] == ExploreConfig(stop=[])


def test_explore_help_lists_the_explore_options(capsys):
    for args, shown in ((["--help"], ("--explore EXPLORE", "--explore.help", "--force")),
                        (["--explore.help", "ExploreConfig"],
                         ("--explore.k K", "--explore.max_new_tokens", "--explore.stop"))):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["explore", *args])
        help_text = capsys.readouterr().out
        assert exit_info.value.code == 0 and all(option in help_text for option in shown), help_text


def test_a_yaml_syntax_error_names_the_file(tmp_path) -> None:
    from selfexplore.cli import main

    bad = tmp_path / "broken.yaml"
    bad.write_text("pipeline:\n  run_dir: [unclosed\n")
    for command in ("pipeline", "fit"):
        with pytest.raises(SystemExit, match=r"broken\.yaml: not valid YAML \(--config\)"):
            main([command, "--config", str(bad)])
