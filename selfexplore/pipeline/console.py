"""What a person sees while the pipeline runs: the plan, unit by unit, and little else.

Each planned unit (see `selfexplore.pipeline.plan`) opens with a header saying which of how
many it is and what it works on (`[10/21] round 1 · first-pit exploration · 310 rejected
rationales, k=4`), shows one progress bar with an ETA while it is long (sampling, training),
and closes with its time and key figure. Libraries speak only when it matters: Lightning's
banners and tips, transformers' loading bars and known harmless warnings go to
`run_dir/pipeline.log` alone unless `verbose`; the log also keeps every console line.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from tqdm.auto import tqdm

from selfexplore.pipeline.plan import duration, key_figure, label, planned_units, verifiers_of

if TYPE_CHECKING:
    from selfexplore.pipeline.config import PipelineConfig
    from selfexplore.pipeline.state import RunState

log = logging.getLogger(__name__)

# Loggers of the libraries the pipeline drives; their INFO lines (Lightning's "GPU available",
# "Seed set", tips) reach the console only when verbose, warnings always.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "transformers", "bitsandbytes", "peft", "vllm")
# Warnings expected in this pipeline that ask nothing of its user: Lightning's PossibleUserWarning
# (fewer batches than the logging interval, no dataloader workers for an in-memory set) and
# libraries' deprecation notes about their own internals ...
HARMLESS_CATEGORIES: tuple[type[Warning], ...] = (PossibleUserWarning, DeprecationWarning, FutureWarning)
# ... and bitsandbytes' note, logged as it loads, that an optional CPU kernel package is missing.
HARMLESS_MESSAGES = ("Failed to load CPU gemm_4bit_forward",)


class _Harmless(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if issubclass(getattr(record, "category", Warning), HARMLESS_CATEGORIES):
            return False
        return not any(h in record.getMessage() for h in HARMLESS_MESSAGES)


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: Any = None, line: str | None = None) -> None:
    """`warnings.showwarning` into the "py.warnings" logger, naming the category (Lightning's own
    format drops it), which the console filter reads."""
    logging.getLogger("py.warnings").warning("%s: %s", category.__name__, message, extra={"category": category})


class _Lines(logging.Formatter):
    """Plain lines for the console; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


@contextmanager
def console_session(log_path: Path | None, verbose: bool = False) -> Iterator[None]:
    """Route our lines to stdout and library output to stderr (quiet unless `verbose`), all to `log_path`.

    Restores every logger, the warnings hook and transformers' progress bars on exit, so a
    pipeline run from Python leaves the caller's logging as it was.
    """
    from transformers.utils import logging as hf_logging

    shared: list[logging.Handler] = []
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_path, encoding="utf-8")
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        shared.append(to_file)
    ours = logging.StreamHandler(sys.stdout)
    ours.setFormatter(_Lines("%(message)s"))
    theirs = logging.StreamHandler(sys.stderr)
    theirs.setFormatter(_Lines("%(message)s"))
    if not verbose:
        theirs.setLevel(logging.WARNING)
        theirs.addFilter(_Harmless())
    saved = {}
    for name, handler in (("selfexplore", ours), ("py.warnings", theirs), *((n, theirs) for n in LIBRARY_LOGGERS)):
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers, logger.level, logger.propagate)
        logger.handlers, logger.propagate = [*shared, handler], False
        if name == "selfexplore":
            logger.setLevel(logging.INFO)
    bars = hf_logging.is_progress_bar_enabled()
    if not verbose:
        hf_logging.disable_progress_bar()  # "Loading weights" at every model load
    try:
        with warnings.catch_warnings():  # restores showwarning on exit
            warnings.showwarning = _log_warning
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        for name, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers, logger.level, logger.propagate = handlers, level, propagate
        for handler in shared:
            handler.close()


class Console:
    """Header and closing line of each planned unit (rank 0; other ranks stay silent)."""

    def __init__(self, config: PipelineConfig, state: RunState, questions: dict[str, int],
                 enabled: bool = True) -> None:
        self.cfg = config
        self.state = state
        self.questions = questions  # "gold", "train", "eval": how many each stage works on
        self.enabled = enabled
        self.plan = planned_units(config.rounds, config.baselines,
                                  verifiers_of(asdict(config.verifier) if config.verifier else None))
        self.started: dict[str, float] = {}
        self._greeted = False

    def start(self, unit: str) -> None:
        """Announce `unit` (once; nested units, such as an evaluation's sample file, are not planned)."""
        if unit in self.started or unit not in self.plan:
            return
        self.started[unit] = time.perf_counter()
        if not self.enabled:
            return
        if not self._greeted:
            self._greeted = True
            done = sum(u in self.state.units for u in self.plan)
            log.info("%s: %d units%s", self.cfg.run_dir, len(self.plan),
                     f", {done} already complete (skipped)" if done else "")
        about = self.about(unit)
        n = len(self.plan)
        log.info("[%*d/%d] %s%s", len(str(n)), self.plan.index(unit) + 1, n, label(unit),
                 f" · {about}" if about else "")

    def finish(self, unit: str, result: dict[str, Any]) -> None:
        if self.started.pop(unit, None) is None or not self.enabled:
            return
        figure = key_figure(unit, result)
        log.info("%s done in %s%s", " " * (2 * len(str(len(self.plan))) + 2),
                 duration(float(result.get("seconds", 0.0))), f" · {figure}" if figure else "")

    def failed(self, unit: str, error: BaseException) -> None:
        started = self.started.pop(unit, None)
        if started is not None and self.enabled:
            log.error("%s failed after %s: %s: %s", label(unit), duration(time.perf_counter() - started),
                      type(error).__name__, error)

    def about(self, unit: str) -> str:
        """What the unit works on, from the config and the results of the units before it."""
        cfg, units, q = self.cfg, self.state.units, self.questions
        head, _, what = unit.partition("/")

        def count(of: str, key: str) -> Any:
            return units.get(of, {}).get(key, "?")

        if unit == "base":
            return f"tiny Llama from scratch at {cfg.model.path}" if cfg.from_scratch else cfg.model.path
        if what.endswith("/eval"):
            sampled = f" + {cfg.eval_samples} samples each" if cfg.eval_samples else ""
            return f"greedy answers to {q['eval']} {cfg.eval_split} questions{sampled}"
        if what.endswith("samples.jsonl"):
            return f"{cfg.sampling.n} samples x {q['train']} questions"
        if what == "sft":
            return f"{_epochs(cfg.sft.epochs)} on {q['gold']} gold rationales"
        if what == "rft":
            return f"{_epochs(cfg.rft.epochs)} on {count(f'{head}/rft_data', 'records')} examples"
        if what == "explore":
            return f"{count(f'{head}/pairs', 'pairs')} rejected rationales, k={cfg.explore.k}"
        if what == "outcome_dpo":
            return f"{_epochs(cfg.dpo.epochs)} on {count(f'{head}/pairs', 'pairs')} outcome pairs"
        if what == "self_explore":
            return f"{_epochs(cfg.dpo.epochs)} on {count(f'{head}/explore', 'num_pairs')} granular pairs"
        if what in ("verifier", "outcome_verifier") and cfg.verifier is not None:
            return f"{_epochs(cfg.verifier.train.epochs)} on {count(f'{head}/prm', 'rows')} process-reward rows"
        if what.endswith("/selection") and cfg.verifier is not None:
            return f"{cfg.verifier.samples} sampled answers x {q['eval']} {cfg.eval_split} questions, every selector"
        return ""


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


class TrainingBar(ProgressBar):
    """One bar over a whole fit (all epochs) with its ETA, instead of Lightning's bar per epoch."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._bar: tqdm | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bar = tqdm(total=trainer.num_training_batches * trainer.max_epochs, desc="train", unit="batch",
                         disable=not (self._enabled and trainer.is_global_zero), leave=False, dynamic_ncols=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._bar is not None:
            metrics = self.get_metrics(trainer, pl_module)
            metrics.pop("v_num", None)  # the logger's version: the same for the whole fit
            self._bar.set_postfix(metrics, refresh=False)
            self._bar.update(1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
