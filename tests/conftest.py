"""Fixtures: a tiny random model and tokenizer, built in the tests (nothing comes from a hub)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import build_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama-like model folder with its tokenizer, loadable by the real loading code."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    build_model(folder, "llama", vocab=len(tokenizer))
    return folder


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from tunesmith.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    """A config dict for a fast run of the demo task on the tiny model."""
    return {
        "model": {"name": str(tiny_model_dir), "dtype": "float32"},
        "data": {"train": "demo", "demo_size": 48, "max_seq_len": 256},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 2e-2, "log_every": 4, "warmup_ratio": 0.0},
        "eval": {"test_limit": 8, "max_new_tokens": 24, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    }
