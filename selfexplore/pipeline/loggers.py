"""The pipeline's experiment logger: any Lightning logger, configured as `fit` configures one.

`trainer.logger` is a `class_path`/`init_args` mapping (a bare class name means one of
`lightning.pytorch.loggers`). Every training unit logs to its own run of that logger, named
after the unit (`round_0/sft`, `round_1/self_explore` ...), and the run's per-stage figures
(the report's rows: accuracy, pairs, first-pit histogram, tokens, seconds) go to one more run,
`pipeline`, with the round as the step; all of them under `run_dir/logs` for loggers that
write files, so `tensorboard --logdir run_dir/logs` (or the W&B / MLflow project) shows one
experiment.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from selfexplore.pipeline.layout import RunLayout
from selfexplore.pipeline.report import report_rows

# The argument each known logger names a run by (CSV / TensorBoard: a folder per run).
RUN_ARGUMENT = {CSVLogger: "version", TensorBoardLogger: "version", WandbLogger: "name", MLFlowLogger: "run_name"}
SUMMARY_RUN = "pipeline"


def logger_class(config: dict[str, Any]) -> type[Logger]:
    """The class `config['class_path']` names; raises ValueError for anything but a Lightning Logger."""
    path = str(config.get("class_path", ""))
    module, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module or "lightning.pytorch.loggers"), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"trainer.logger.class_path {path!r} does not name an importable class ({error})") from None
    if not (isinstance(cls, type) and issubclass(cls, Logger)):
        raise ValueError(f"trainer.logger.class_path {path!r} is not a lightning.pytorch.loggers.Logger")
    unknown = set(config) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"trainer.logger has keys {sorted(unknown)}; only class_path and init_args")
    return cls


def build_logger(config: dict[str, Any], run_dir: str | Path, run: str) -> Logger:
    """A new instance of the configured logger for one run of the experiment (a unit, or 'pipeline')."""
    cls = logger_class(config)
    params = inspect.signature(cls).parameters
    kwargs = dict(config.get("init_args") or {})
    if "save_dir" in params:
        kwargs.setdefault("save_dir", str(RunLayout(run_dir).logs))
    if issubclass(cls, (CSVLogger, TensorBoardLogger)):
        kwargs.setdefault("name", "")  # no experiment sub-folder: run_dir/logs/<run>
    key = next((arg for base, arg in RUN_ARGUMENT.items() if issubclass(cls, base)), None)
    if key is not None:
        kwargs[key] = run  # each unit its own run, whatever one value the config gives
    return cls(**kwargs)


def round_metrics(units: dict[str, dict[str, Any]], rounds: int) -> list[tuple[int, dict[str, float]]]:
    """(round, metrics) per report row, keys prefixed by stage (`self_explore/accuracy`, `.../pits/step_3`)."""
    out = []
    for row in report_rows(units, rounds):
        stage = row["stage"].lower().replace(" ", "_").replace("-", "_")
        metrics = {f"{stage}/{key}": float(row[key]) for key in
                   ("accuracy", "sampled_accuracy", "pass_at_n", "pairs", "pit_at_first_error", "tokens", "seconds")
                   if row[key] is not None}
        metrics.update({f"{stage}/pits/step_{step}": float(n) for step, n in (row["pits"] or {}).items()})
        out.append((row["round"], metrics))
    return out


def log_round_metrics(config: dict[str, Any], run_dir: str | Path, units: dict[str, dict[str, Any]],
                      rounds: int) -> None:
    """Send the report's figures to the configured logger's 'pipeline' run (once, at the end of a run)."""
    logger = build_logger(config, run_dir, SUMMARY_RUN)
    for round_index, metrics in round_metrics(units, rounds):
        logger.log_metrics(metrics, step=round_index)
    logger.finalize("success")
