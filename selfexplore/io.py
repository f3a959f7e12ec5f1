"""Plain-file I/O shared by every stage: JSONL with precise errors, atomic writes.

Every stage reads and writes plain files under one run directory. Bad input must name the
file, line and field; a killed process must never leave a half-written file behind.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


class DataError(ValueError):
    """Bad input data, located precisely (file, 1-based line, field)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 line: int | None = None, field: str | None = None) -> None:
        where = []
        if path is not None:
            where.append(str(path))
        if line is not None:
            where.append(f"line {line}")
        if field is not None:
            where.append(f"field '{field}'")
        self.path, self.line, self.field = path, line, field
        super().__init__(f"{': '.join([', '.join(where)] if where else [])}{': ' if where else ''}{message}")


def parse_record(raw: str | bytes, path: str | os.PathLike, lineno: int) -> dict[str, Any]:
    """One JSONL line -> a JSON object; anything else raises DataError naming file and line."""
    try:
        record = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", path, lineno) from None
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at column {e.colno})", path, lineno) from None
    except RecursionError:  # the json module recurses once per nesting level
        raise DataError("JSON nested too deeply to read", path, lineno) from None
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}", path, lineno)
    return record


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line_number, record) for each non-blank line; a malformed line raises DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", path)
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if raw.strip():
                yield lineno, parse_record(raw, path, lineno)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSONL file (see `iter_jsonl` for the error contract)."""
    return [record for _, record in iter_jsonl(path)]


def require_str(record: dict[str, Any], field: str, path: str | os.PathLike | None = None,
                line: int | None = None, allow_empty: bool = False) -> str:
    """Return record[field] as a string, or raise DataError naming file, line and field."""
    if field not in record:
        raise DataError("missing field", path, line, field)
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__}", path, line, field)
    if not allow_empty and not value.strip():
        raise DataError("empty value", path, line, field)
    return value


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """A file opened for writing that replaces `path` only when the block completes.

    Readers see either the old file or the whole new one, never a part; a crash or kill
    leaves at most a hidden temporary file beside it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(text)


def write_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Atomically write records as JSONL; returns the number written."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write one JSON document (state files, manifests, stats)."""
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"not valid JSON ({e.msg} at line {e.lineno})", path, e.lineno) from None


AT_FDCWD, RENAME_EXCHANGE = -100, 2  # renameat2(2): paths relative to the cwd; swap two existing paths


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2); False where unsupported."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    if rename(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. a file system without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def _folder_lock(out: Path) -> Iterator[None]:
    """Serialize the writers that replace `out`: an flock on its parent folder (no lock file left
    behind; replacing a folder is rare, so sharing the lock with its siblings costs nothing)."""
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside `out_dir`; on success it replaces `out_dir` in one step.

    A crash inside the block leaves `out_dir` as it was (the temp folder is removed; a killed
    process can leave a hidden `.<name>.tmp-*` sibling, never a half-written `out_dir`).
    Replacing swaps the two folders atomically (renameat2 exchange), so a reader always finds a
    whole `out_dir`; writers of one folder take turns (a lock on its parent), so two exports of the
    same folder never fail or leave a folder behind. With `replace=False` an `out_dir` that
    exists by then (another process finished the same work first: a cache) is kept and the new
    folder discarded.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        with _folder_lock(out):
            if not out.exists():
                os.replace(tmp, out)
            elif not replace:
                shutil.rmtree(tmp)
            elif _exchange(tmp, out):
                shutil.rmtree(tmp)  # now the old folder
            else:  # no exchange here: two renames, the lock keeps other writers out of the gap
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what killed atomic writes left at `path`: in a folder, its hidden `.*.tmp-*` /
    `.*.old-*` folders (`atomic_dir`) and `.*.tmp` files (`atomic_open`); for a file, its own
    `.<name>.*.tmp` siblings. Call only while no other process writes there (a 7B export's
    leftovers are gigabytes). Returns what was removed."""
    path = Path(path)
    if path.is_dir():
        stale = [p for pattern in (".*.tmp-*", ".*.old-*", ".*.tmp") for p in path.glob(pattern)]
    else:
        stale = list(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale
