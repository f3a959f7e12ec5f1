"""One pipeline per run directory: an exclusive lock that a killed run cannot leave behind.

Two pipelines on one run directory would run every unit twice and race on the same exports.
The lock is an OS file lock (`flock`) on `run_dir/.lock`, so it is released when its holder
exits, however it exits: a killed run never blocks the next one. The file records who holds
it (host, pid, start time) for the error the second pipeline gets.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """Holds the run directory exclusively from `acquire()` until `release()` (or until this
    object is garbage, or the process ends: the lock lives on an open file)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held open while the lock is)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read(4096).strip() or "unknown"
            f.close()
            raise RunLocked(f"{self.path.parent} is in use by another pipeline ({holder}); wait for it to "
                            "finish or stop it, or use another run_dir") from None
        except OSError as error:  # a file system without locks (some network mounts): say so, go on
            log.warning("%s: cannot lock the run directory (%s); make sure no other pipeline uses it",
                        self.path.parent, error)
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file releases the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
