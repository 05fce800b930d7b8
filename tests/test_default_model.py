"""End-to-end on the real default model (SmolLM2-135M-Instruct from its PyPI wheel): slow, run in CI."""
import json

import pytest

import tunesmith

pytestmark = pytest.mark.slow


def test_short_real_fine_tune_of_the_default_model(tmp_path):
    results = tunesmith.train({
        "model": "default",
        "data": {"train": "demo", "demo_size": 48, "max_seq_len": 256},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2},
        "eval": {"test_limit": 8, "max_new_tokens": 40, "batch_size": 8},
        "output": {"dir": str(tmp_path / "run")},
    })
    assert results["fine_tuned"]["eval_loss"] < results["base"]["eval_loss"]
    assert results["fine_tuned"]["json_valid"] >= results["base"]["json_valid"]
    config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (tmp_path / "run" / "adapter" / "chat_template.jinja").exists()


def test_generate_streams_from_the_trained_run(tmp_path):
    import subprocess
    import sys

    run = tmp_path / "run"
    tunesmith.train({"data": {"demo_size": 16}, "train": {"max_steps": 1, "batch_size": 4},
                     "eval": {"generate": False}, "output": {"dir": str(run)}})
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "generate", str(run), "Hello, who are you?",
                           "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
