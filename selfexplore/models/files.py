"""Where model folders come from and how they are written: offline-friendly sources, atomic folders."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# "name" or "org/name": anything else that is not an existing folder can only be a typo'd path.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(path: str | os.PathLike) -> tuple[str, bool]:
    """(what to pass to `from_pretrained`, whether it is a local folder).

    A `gguf:` spec becomes its cached HF folder (converted on first use, see `models.gguf`).
    An existing folder is loaded with `local_files_only`. A string shaped like a Hub id
    ("org/name") is left to transformers, which only reads its cache when HF_HUB_OFFLINE is set.
    Anything else raises FileNotFoundError naming the path, before transformers can turn
    it into an obscure Hub error.
    """
    text = local_model_path(path)
    local = Path(text).expanduser()
    if local.is_dir():
        return str(local), True
    if local.exists():
        hint = f" (for a GGUF file use the spec 'gguf:{text}')" if text.endswith(".gguf") else ""
        raise NotADirectoryError(f"'{text}' is a file; expected a Hugging Face model folder{hint}")
    if _HUB_ID.fullmatch(text) and ".." not in text:
        return text, False
    raise FileNotFoundError(f"path '{text}' does not exist (resolved to '{local.resolve()}')")


def local_model_path(path: str | os.PathLike) -> str:
    """`path` itself, or for a `gguf:` spec the folder it converts to: what any loader can open."""
    from selfexplore.models.gguf import is_gguf_spec, resolve_gguf

    text = os.fspath(path)
    return str(resolve_gguf(text)) if is_gguf_spec(text) else text


@contextmanager
def explain_missing(source: str, local: bool) -> Iterator[None]:
    """Re-raise a failed Hub lookup as FileNotFoundError that says what was tried."""
    try:
        yield
    except OSError as e:
        if local:
            raise
        raise FileNotFoundError(
            f"'{source}' is not a local folder and could not be loaded as a Hugging Face Hub id "
            f"(no network, or not in the cache while HF_HUB_OFFLINE is set): {e}") from e


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield an empty temp folder beside `out_dir`; on success it replaces `out_dir` in one rename.

    A crash inside the block leaves `out_dir` as it was (the temp folder is removed; a killed
    process can leave a hidden `.<name>.tmp-*` sibling, never a half-written `out_dir`).
    With `replace=False` an `out_dir` that exists by then (another process finished the same
    work first: a cache) is kept and the new folder discarded.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        if not replace:
            try:
                os.replace(tmp, out)  # atomic; fails if another process's folder is already there
            except OSError:
                if not out.is_dir():
                    raise
                shutil.rmtree(tmp)
        elif out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
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
