"""Fixtures: a tiny random model and tokenizer, built in the tests (nothing comes from a hub)."""
from __future__ import annotations

import os
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


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection sees the marks
def pytest_collection_modifyitems(items):
    """`long` implies `slow`: a long test is marked only `long` and still stays out of `make test`."""
    for item in items:
        if item.get_closest_marker("long"):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI (.ci/run sets TUNESMITH_REQUIRE_BROWSER=1) a browser test skipped for want of
    chromium fails instead: CI must not pass with every browser test left out."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TUNESMITH_REQUIRE_BROWSER") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if "chromium" in reason or "chromedriver" in reason or "selenium" in reason:
            report.outcome = "failed"
            report.longrepr = f"TUNESMITH_REQUIRE_BROWSER=1 but the browser test was skipped: {reason}"


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Family name -> folder with its tokenizer (built on first use, once per session)."""
    from families import build_family_tokenizer

    root = tmp_path_factory.mktemp("families")
    built: dict = {}

    def get(name: str):
        if name not in built:
            from tunesmith.models import load_tokenizer

            build_family_tokenizer(name, root / name)
            built[name] = (root / name, load_tokenizer(str(root / name)))  # as training loads it
        return built[name]

    return get
