"""Content hashes and derived seeds: sha256 everywhere, so they are stable across processes,
machines and Python runs (unlike `hash()`), and cheap to import (no torch)."""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from hashlib import _Hash

_CHUNK = 1 << 20


def text_sha256(text: str) -> str:
    """Hex sha256 of `text` as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def update_with_file(h: _Hash, path: str | os.PathLike) -> _Hash:
    """Feed a file's bytes into `h`, streamed (model weights are gigabytes); returns `h`."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's content."""
    return update_with_file(hashlib.sha256(), path).hexdigest()


def derive_seed(seed: int, *keys: int | str, bits: Literal[63, 31] = 63) -> int:
    """A stable seed for a sub-task (batch, shard, prompt, wave): a function of `seed` and `keys`
    only, independent of run order.

    63 bits (the digest's first 8 bytes, little-endian, halved): the samplers' shard, row and
    prompt seeds. 31 bits (its first 4 bytes, big-endian, top bit cleared): the exploration
    stage's chunk, wave and retry seeds. Both are kept as they are so that existing runs
    reproduce (and resume) with the same samples.
    """
    digest = hashlib.sha256(":".join(str(k) for k in (seed, *keys)).encode()).digest()
    if bits == 31:
        return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
    if bits != 63:
        raise ValueError(f"bits must be 63 or 31, got {bits}")
    return int.from_bytes(digest[:8], "little") >> 1
