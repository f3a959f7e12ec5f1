"""Guarding resumable shard folders: a manifest records the settings its shards were made with.

The sample and explore stages write shards that a rerun resumes. Resuming under other settings
(model, seed, input, ...) would mix two runs' outputs, and discarding the shards would lose
finished work, so both stages refuse another run's folder with a per-key diff unless forced.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from selfexplore.configdiff import config_diff, format_diff
from selfexplore.io import read_json


def load_manifest(path: Path, settings: dict[str, Any], manifest_format: int, force: bool,
                  stage: str) -> dict[str, Any]:
    """The manifest of an earlier `stage` run at `path` with the same settings ({} when none).

    A manifest with other settings (or format) raises ValueError naming each changed key, unless
    `force`, which deletes the manifest's folder with its shards.
    """
    if not path.is_file():
        return {}
    manifest = read_json(path)
    if not isinstance(manifest, dict):
        manifest = {}
    old = manifest.get("config")
    if manifest.get("format") == manifest_format and old == settings:
        return manifest
    if not force:
        diff = format_diff(config_diff(old, settings)) if isinstance(old, dict) else ""
        raise ValueError(
            f"{path} belongs to a {stage} run with a different config ({diff or 'manifest format'}). "
            f"Resuming would mix the outputs of two configs. Use another output path, or force=True "
            f"(--force) to discard the existing shards.")
    shutil.rmtree(path.parent)
    return {}
