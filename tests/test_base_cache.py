"""A resumed run keeps the base model's scores of its first start (eval/base_cache.py): the same
figures as a run never stopped, scored again where anything that decides them changed."""
from __future__ import annotations

import json
import math
import signal
import sys

import pytest

from helpers import qa_rows, run_cli, start_and_kill_at, write_config, write_jsonl
from tunesmith.eval.base_cache import BaseScores, fingerprint, scorer_source
from tunesmith.eval.compare import Scored

KEPT = "as scored at this run's first start"


def scored_config(tmp_path, model_dir, run: str):
    """A run that scores base rows (zero-shot, 1-shot, retrieval) and the probe's base half."""
    path = write_config(tmp_path, model_dir, run, max_steps=40)
    config = json.loads(path.read_text())
    config["data"]["test"] = str(write_jsonl(tmp_path / "test.jsonl", qa_rows(54)[48:]))
    config["eval"] = {"generate": True, "max_new_tokens": 6, "kshot": 1, "retrieval_k": 1, "general": True,
                      "general_limit": 2, "general_sets": ["arc_easy"]}
    path.write_text(json.dumps(config))
    return path


def base_figures(run) -> tuple[dict, dict]:
    results = json.loads((run / "results.json").read_text())
    return ({name: means for name, means in results["baselines"]["models"].items() if name.startswith("base")},
            results["general"]["base"])


@pytest.mark.slow  # three training processes: the 10-minute budget of `make test`; in .ci/run's slow set
def test_a_resumed_run_reuses_the_base_scores_of_its_first_start(tiny_model_dir, tmp_path):
    config = scored_config(tmp_path, tiny_model_dir, "run")
    run = tmp_path / "run"
    assert start_and_kill_at(config, run, 3, sig=signal.SIGTERM) != 0
    assert (run / "base_scores.json").is_file()
    step = int(sorted((run / "checkpoints").glob("step-*"))[-1].name.removeprefix("step-"))
    ended = run_cli(config, f"train.max_steps={step}")
    assert ended.returncode == 0, ended.stderr
    assert f"base rows (base, base 1-shot, base + retrieval): {KEPT}" in ended.stderr
    assert f"general ability of the base: {KEPT}" in ended.stderr
    # The figures a run that was never stopped gives (the base is scored before any training step).
    whole = json.loads(config.read_text())
    whole["output"]["dir"] = str(tmp_path / "whole")
    whole["train"]["max_steps"] = step
    (tmp_path / "whole.json").write_text(json.dumps(whole))
    uninterrupted = run_cli(tmp_path / "whole.json")
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    assert KEPT not in uninterrupted.stderr
    assert base_figures(run) == base_figures(tmp_path / "whole")


def test_the_fingerprint_follows_what_decides_the_base_answers(tiny_model_dir, tmp_path):
    import torch

    from tunesmith.config import Config
    from tunesmith.eval.base_cache import probe_key, rows_key

    config = Config(**json.loads(scored_config(tmp_path, tiny_model_dir, "run").read_text()))
    prompts, pool, cpu = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]], [], torch.device("cpu")

    def keys(cfg, dtype=torch.float32, device=cpu, asked=prompts):
        return rows_key(cfg, dtype, device, asked, pool, "padded"), probe_key(cfg, dtype, device, {"arc_easy": [1]})

    first = keys(config)
    assert keys(config) == first
    # a resume may change these: the base's answers stay
    assert keys(config.model_copy(update={"train": config.train.model_copy(update={"max_steps": 7, "log_every": 3})})) == first
    longer = config.model_copy(update={"eval": config.eval.model_copy(update={"max_new_tokens": 5})})
    assert keys(longer)[0] != first[0] and keys(longer)[1] == first[1]  # the probe does not generate by it
    quantised = config.model_copy(update={"adapter": config.adapter.model_copy(update={"method": "qlora"})})
    for other in (keys(quantised), keys(config, dtype=torch.bfloat16), keys(config, device=torch.device("meta"))):
        assert other[0] != first[0] and other[1] != first[1]
    assert keys(config, asked=prompts * 2)[0] != first[0]
    (tiny_model_dir / "extra.txt").write_text("a file of the model folder changed")
    try:
        assert keys(config)[0] != first[0]
    finally:
        (tiny_model_dir / "extra.txt").unlink()


def test_kept_rows_read_back_as_scored_and_a_foreign_file_is_ignored(tmp_path):
    rows = [Scored("base", ["a", "b"], [{"rouge_l": 0.5, "answer_loss": 1.25}, {"rouge_l": 0.25, "answer_loss": 2.0,
                                                                               "field_x": float("nan")}], [3, 4], 12.5, ["x", "y"])]
    calls = []

    def score():
        calls.append(1)
        return rows

    kept = BaseScores(tmp_path / "base_scores.json")
    assert kept.rows("k1", score) is rows and len(calls) == 1
    again = BaseScores(tmp_path / "base_scores.json").rows("k1", score)
    means = {k: v for k, v in again[0].means().items() if k != "field_x"}  # NaN: no example has it
    assert len(calls) == 1 and means == {"answer_loss": (1.25 * 3 + 2.0 * 4) / 7, "rouge_l": 0.375}
    assert again[0].answers == ["a", "b"]
    assert again[0].tokens == [3, 4] and again[0].generated_tokens_per_second == 12.5
    assert math.isnan(again[0].rows[1]["field_x"]) and again[0].references == ["x", "y"]
    BaseScores(tmp_path / "base_scores.json").rows("k2", score)  # another fingerprint
    assert len(calls) == 2
    BaseScores(tmp_path / "base_scores.json").rows(None, score)  # None: never kept
    assert len(calls) == 3
    for foreign in ("[1, 2]", '{"rows": {"key": "k2", "value": [{"name": "base", "odd": 1}]}}', "{not json"):
        (tmp_path / "base_scores.json").write_text(foreign)
        assert BaseScores(tmp_path / "base_scores.json").rows("k2", score) is rows
    assert len(calls) == 6


def test_an_edited_scorer_changes_the_fingerprint_and_an_unfound_one_keeps_nothing(tmp_path, monkeypatch):
    """Found as load_scorer finds it (next to the data: the current folder, which the `tunesmith`
    script does not put on sys.path; a .py file; a package's module), and never run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    module = tmp_path / "my_scorer_for_cache.py"
    module.write_text("def score(answer, reference):\n    return {'m': 1.0}\n")
    package = tmp_path / "my_scorers_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise SystemExit('a package was run')\n")
    (package / "metric.py").write_text("def score(answer, reference):\n    return {'m': 2.0}\n")
    before = scorer_source("my_scorer_for_cache:score")
    assert before not in ("", None) and scorer_source("my_scorer_for_cache.py:score") == before
    module.write_text("def score(answer, reference):\n    return {'m': 0.0}\n")
    assert scorer_source("my_scorer_for_cache:score") not in (before, "", None)
    assert scorer_source("my_scorers_pkg.metric:score") not in ("", None)
    assert "my_scorer_for_cache" not in sys.modules and "my_scorers_pkg" not in sys.modules  # found, not run
    assert scorer_source("no_such_module_here:score") == "" and scorer_source(None) is None
    assert fingerprint([1, {"b": 2, "a": 1}]) == fingerprint([1, {"a": 1, "b": 2}]) != fingerprint([1, {"a": 2}])


def test_an_edited_template_file_changes_the_fingerprint(tiny_model_dir, tmp_path):
    import torch

    from tunesmith.config import Config
    from tunesmith.data.templates import NAMED_TEMPLATES
    from tunesmith.eval.base_cache import rows_key

    jinja = tmp_path / "chat.jinja"
    jinja.write_text(NAMED_TEMPLATES["chatml"])
    raw = json.loads(scored_config(tmp_path, tiny_model_dir, "run").read_text())
    raw["data"]["chat_template"] = str(jinja)
    config = Config(**raw)
    first = rows_key(config, torch.float32, torch.device("cpu"), [], [], "padded")
    jinja.write_text(NAMED_TEMPLATES["chatml"] + "{# edited #}")
    assert rows_key(config, torch.float32, torch.device("cpu"), [], [], "padded") != first
