"""Where model folders come from: offline-friendly sources (local folders, cached Hub ids, `gguf:`
specs) and the tokenizer loaded from one. Atomic folders are `selfexplore.io.atomic_dir`."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def load_tokenizer(path: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (never touches the network) or a cached Hub id.

    Without a pad token, pad is set to EOS (with a warning): padded positions are masked by
    the attention mask and labels, so sharing the id is harmless; a tokenizer with neither
    pad nor EOS is rejected.
    """
    from transformers import AutoTokenizer

    source, local = resolve_source(path)
    with explain_missing(source, local):
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=local, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at '{source}' has neither a pad nor an eos token")
        warnings.warn(f"tokenizer at '{source}' has no pad token; using eos {tokenizer.eos_token!r} as pad",
                      stacklevel=2)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
