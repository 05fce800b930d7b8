"""The Python API: `tunesmith.<command>` is the function the command line calls."""
from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import tunesmith
from helpers import qa_rows, write_jsonl


@pytest.mark.parametrize("name", sorted(tunesmith.LAZY))
def test_each_command_is_the_function_the_cli_calls(name):
    module, function = tunesmith.LAZY[name]
    for other, _ in tunesmith.LAZY.values():  # a submodule import sets its name on the package
        importlib.import_module(other)
    assert getattr(tunesmith, name) is getattr(importlib.import_module(module), function)
    assert callable(getattr(tunesmith, name)) and name in tunesmith.__all__


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'fine_tune'"):
        tunesmith.fine_tune


def test_importing_tunesmith_loads_neither_torch_nor_transformers():
    code = "import sys, tunesmith; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_data_check_and_plan_from_python(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "qa.jsonl", qa_rows(20))
    report = tunesmith.check_data(str(data), str(tiny_model_dir), tmp_path / "check")
    assert report["records"] == 20
    found = tunesmith.plan_for(model="llama-3.1-8b", method="qlora", seq=512, batch=2, include_this_machine=False)
    assert found.setup.method == "qlora" and any(fit.fits for fit in found.fits)
