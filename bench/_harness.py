"""What every bench shares: one JSON line per result, arith-trained tiny models, medians over
alternated repeats, a `--smoke` mode the test suite runs, and re-running a bench as a worker.

A bench is `python bench/<name>.py [--smoke]`; `main(argv)` only holds its sweep. Workers run in a
fresh process (own peak RSS, own imports, another Python environment) through `run_worker`, and
the bench's `main` hands such a call to `serve_worker` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

#: Default repeats of every timed measurement (medians are reported).
REPEATS = 3
_WORKER_FLAG = "--worker"
_RESULT = "RESULT "

K = TypeVar("K")
T = TypeVar("T")


def emit(**fields: object) -> None:
    """One result as one JSON line, flushed (benches are read line by line while they run)."""
    print(json.dumps(fields, ensure_ascii=False, default=str), flush=True)


def bench_parser(doc: str | None, repeats: int | None = REPEATS) -> argparse.ArgumentParser:
    """An argument parser with `--smoke` and, for benches that time things, `--repeats`."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="seconds-long run on tiny sizes (the test suite's)")
    if repeats is not None:
        parser.add_argument("--repeats", type=int, default=repeats, help="alternated repeats (medians reported)")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
               smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parsed `argv`; with `--smoke`, the `smoke` values replace the given ones."""
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in smoke.items():
            setattr(args, key, value)
    return args


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def alternated(runs: Mapping[K, Callable[[int], T]], repeats: int = REPEATS) -> dict[K, list[T]]:
    """`repeats` results per run (each called with the repeat index), the order reversed every
    other repeat, so a load drift on shared cores hits every run alike."""
    results: dict[K, list[T]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            results[name].append(runs[name](repeat))
    return results


def arith_texts(split: str = "train", **task_options: Any) -> list[str]:
    """Prompt + gold solution of every arith problem of `split`: what the tiny tokenizers learn from."""
    from selfexplore.tasks import get_task

    task = get_task("arith", **task_options)
    return [task.prompt(p) + p.solution for p in task.load(split)]


def build_arith_model(out: str | os.PathLike, shape: str = "test", task_options: Mapping[str, Any] | None = None,
                      seed: int = 0, **overrides: int) -> Path:
    """An untrained tiny Llama of a named shape (`selfexplore.models.tiny.TINY_SHAPES`) on arith texts."""
    from selfexplore.models.tiny import build_tiny_llama, tiny_shape

    return build_tiny_llama(arith_texts(**dict(task_options or {})), out, tiny_shape(shape, **overrides), seed)


def slipped_answer(problem: Any, offset: int = 1) -> str:
    """The gold solution of an arith problem with its final answer off by `offset`: a wrong rationale."""
    return f"{problem.solution.rsplit(' ', 1)[0]} {int(problem.answer) + offset}"


def spawn_worker(script: str | os.PathLike, name: str, payload: Mapping[str, Any] | None = None, *,
                 env: Mapping[str, str] | None = None, python: str = sys.executable) -> subprocess.Popen[str]:
    """Start `script` as worker `name` (see `serve_worker`); `python` may be another environment's."""
    command = [python, str(script), _WORKER_FLAG, name, json.dumps(dict(payload or {}))]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ if env is None else env))


def worker_result(proc: subprocess.Popen[str], timeout: float | None = None) -> dict[str, Any]:
    """The result a worker printed; RuntimeError with its output's tail when it failed."""
    stdout, stderr = proc.communicate(timeout=timeout)
    lines = [line for line in stdout.splitlines() if line.startswith(_RESULT)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(stdout[-4000:] + stderr[-8000:])
        raise RuntimeError(f"worker {proc.args[3]} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(_RESULT):])


def run_worker(script: str | os.PathLike, name: str, payload: Mapping[str, Any] | None = None, *,
               env: Mapping[str, str] | None = None, python: str = sys.executable,
               timeout: float | None = None) -> dict[str, Any]:
    """Run one worker to its end and return its result."""
    return worker_result(spawn_worker(script, name, payload, env=env, python=python), timeout)


def serve_worker(workers: Mapping[str, Callable[..., Mapping[str, Any]]],
                 argv: Sequence[str] | None = None) -> bool:
    """If `argv` is a worker call, run that worker on its payload, print its result and return True."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] != [_WORKER_FLAG]:
        return False
    result = workers[argv[1]](**json.loads(argv[2]))
    print(_RESULT + json.dumps(dict(result), default=str), flush=True)
    return True
