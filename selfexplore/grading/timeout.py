"""Hard time limits for the symbolic grader, from any thread.

Two mechanisms, chosen per call by `run_limited`:

* On the main thread of a POSIX process: SIGALRM through setitimer. It nests with any timer
  that is already running (pytest-timeout, an outer limit): the earlier deadline wins and the
  outer timer is restored afterwards. The exception derives from BaseException so sympy's
  `except Exception` blocks cannot swallow it, and the alarm re-fires every 20 ms until the
  limited block has been left, in case a bare `except:` does.
* Anywhere else (Lightning or dataloader threads, Windows): a pool of persistent worker
  processes, one per concurrent caller, fed one JSON line per request. The worker enforces
  the limit on itself with the alarm above and answers in time; if it does not, the caller
  kills it at the deadline and the next call starts a fresh worker. Workers also run under
  a memory limit. Starting a worker (about a second, importing sympy) is not counted against
  a call's time limit, so a cold start never turns a correct answer into a timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: How long a new worker process may take to import sympy and report ready.
WORKER_START_TIMEOUT = 60.0
#: Address-space limit of a worker process (POSIX), so hostile input cannot eat the machine.
WORKER_MEMORY_BYTES = 2 << 30
_REFIRE = 0.02
_PACKAGE = "selfexplore.grading."


class TimeLimitExceeded(BaseException):
    """The limited block overran its time limit (BaseException so broad handlers miss it)."""


def alarm_usable() -> bool:
    """Whether SIGALRM can time-limit code on the calling thread."""
    if not hasattr(signal, "setitimer"):
        return False
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGALRM) is None:  # installed outside Python: leave it alone
        return False
    return signal.SIGALRM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


class _Window:
    """State of one alarm window; the handler is a no-op once the window is closed."""

    def __init__(self) -> None:
        self.active = True
        self.fired = False


def _close(window: _Window) -> None:
    while True:
        try:
            window.active = False
            return
        except TimeLimitExceeded:  # a last alarm landed while closing: close again
            continue


@contextlib.contextmanager
def alarm_limit(seconds: float) -> Iterator[None]:
    """Raise TimeLimitExceeded in the main thread if the block runs longer than `seconds`."""
    window = _Window()

    def handler(signum: int, frame: Any) -> None:
        if window.active:
            window.fired = True
            signal.setitimer(signal.ITIMER_REAL, _REFIRE)
            raise TimeLimitExceeded

    start = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, 0)  # pause an outer timer
    outer_handler = signal.getsignal(signal.SIGALRM)
    try:
        signal.signal(signal.SIGALRM, handler)
        delay = seconds if outer_delay <= 0 else min(seconds, outer_delay)
        signal.setitimer(signal.ITIMER_REAL, max(delay, 1e-6))
        yield
        if window.fired:  # the alarm was swallowed inside and the block finished late
            raise TimeLimitExceeded
    finally:
        _close(window)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, outer_handler)
        if outer_delay > 0:
            left = outer_delay - (time.monotonic() - start)
            signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), outer_interval)


def within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or None if it overran `seconds`; for sub-budgets inside an already limited
    call (where no alarm is usable, it just runs: the enclosing limit still holds)."""
    if not alarm_usable():
        return fn(*args)
    try:
        with alarm_limit(seconds):
            return fn(*args)
    except TimeLimitExceeded:
        return None


class _Worker:
    """One child process running `python -m selfexplore.grading.worker`."""

    def __init__(self) -> None:
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["OMP_NUM_THREADS"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "selfexplore.grading.worker"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, text=True, encoding="utf-8", bufsize=1)
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True, name="grading-worker-reader").start()
        try:
            ready = self.replies.get(timeout=WORKER_START_TIMEOUT)
        except queue.Empty:
            ready = None
        if ready is None or ready.strip() != "ready":
            self.kill()
            raise RuntimeError("the grading worker process did not start")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            for line in self.proc.stdout:
                self.replies.put(line)
        self.replies.put(None)

    def call(self, target: str, args: list[Any], seconds: float) -> tuple[bool, Any]:
        """(answered_in_time, result); on False the worker is dead and must be dropped."""
        assert self.proc.stdin is not None
        deadline = time.monotonic() + seconds
        try:
            self.proc.stdin.write(json.dumps({"target": target, "args": args,
                                              "seconds": seconds}) + "\n")
            self.proc.stdin.flush()
            line = self.replies.get(timeout=max(deadline - time.monotonic(), 0.0))
        except (OSError, ValueError, queue.Empty):
            line = None
        try:
            return True, json.loads(line)["result"]
        except (TypeError, ValueError, KeyError):  # no reply (None) or a garbled one
            self.kill()
            return False, None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                if stream is not None:
                    stream.close()


class _Pool:
    """Idle workers, shared by threads; a worker serves one call at a time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.live: set[_Worker] = set()

    def call(self, target: str, args: list[Any], seconds: float) -> Any:
        with self.lock:
            worker = self.idle.pop() if self.idle else None
        if worker is None:
            try:
                worker = _Worker()
            except (OSError, RuntimeError) as err:
                warnings.warn(f"symbolic grading unavailable off the main thread: {err}",
                              RuntimeWarning, stacklevel=3)
                return None
            with self.lock:
                self.live.add(worker)
        answered, result = worker.call(target, args, seconds)
        with self.lock:
            if answered:
                self.idle.append(worker)
            else:
                self.live.discard(worker)
        return result

    def shutdown(self) -> None:
        with self.lock:
            workers, self.idle, self.live = list(self.live), [], set()
        for worker in workers:
            worker.kill()

    def forget_after_fork(self) -> None:
        """In a forked child the workers belong to the parent. Their pipe objects are kept
        referenced and never closed: a reader thread of the parent may have held their
        internal locks at fork time, so closing (or garbage-collecting) them could hang."""
        _INHERITED.extend(self.live)
        self.lock = threading.Lock()
        self.idle, self.live = [], set()


_INHERITED: list[_Worker] = []
_POOL = _Pool()
atexit.register(_POOL.shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget_after_fork)


def resolve(target: str) -> Callable[..., Any]:
    """The function named 'module:qualname'; only functions of this package may be named."""
    module, _, name = target.partition(":")
    if not module.startswith(_PACKAGE) or not name.isidentifier():
        raise ValueError(f"not a grading function: {target!r}")
    return getattr(importlib.import_module(module), name)


def run_limited(fn: Callable[..., Any], args: tuple[Any, ...], seconds: float) -> Any:
    """fn(*args) if it finishes within `seconds`, else None.

    On the main thread this runs in-process under SIGALRM; elsewhere in a worker process, so
    `fn` must be a module-level function of this package taking and returning JSON values.
    """
    if alarm_usable():
        return within(seconds, fn, *args)
    return _POOL.call(f"{fn.__module__}:{fn.__qualname__}", list(args), seconds)
