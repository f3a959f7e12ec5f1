"""Shared fixtures: a tiny Llama (hidden 64, 2 layers, head_dim 32) built from arith text."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: 1 thread is as fast, and never spins
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.fixture(scope="session")
def tiny_arith_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny Llama + tokenizer for the arith task, as a normal HF folder."""
    from selfexplore.models.tiny import build_tiny_llama, tiny_shape
    from selfexplore.tasks import get_task

    task = get_task("arith", train_size=400, validation_size=50, test_size=50)
    texts = [task.prompt(p) + p.solution for p in task.load("train")]
    return build_tiny_llama(texts, tmp_path_factory.mktemp("tiny") / "model", tiny_shape("test"))
