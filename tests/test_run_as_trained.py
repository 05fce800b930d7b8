"""A finished run is read again as it was trained, from any directory.

The run here trains from a spreadsheet-style CSV named relative to the project folder, with the
user's own column names (data.columns) and a system prompt (data.system_prompt). Later commands
run elsewhere: export's check prompts, compare's retrieval pool and the system prompt that chat,
compare, eval and pairs ask the run with must still be what training saw.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml

import tunesmith
from tunesmith.config import load_config
from tunesmith.setting_keys import result_keys
from tunesmith.start import anchored

SYSTEM = "Triage the ticket in one word."


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory) -> Path:
    """A project folder holding tickets.csv, the config naming it relatively, and the trained run."""
    folder = tmp_path_factory.mktemp("project")
    with open(folder / "tickets.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ticket", "team"])
        for i in range(24):
            writer.writerow([f"Ticket {i}: my {'screen' if i % 2 else 'invoice'} is wrong", "tech" if i % 2 else "billing"])
    config = {"model": {"name": str(tiny_model_dir), "dtype": "float32"},
              "data": {"train": "tickets.csv", "columns": {"question": "ticket", "answer": "team"},
                       "system_prompt": SYSTEM, "max_seq_len": 128},
              "train": {"max_steps": 2, "batch_size": 4, "checkpoint_every": 1},
              "eval": {"generate": False}, "output": {"dir": "runs/mine"}}
    (folder / "my.yaml").write_text(yaml.safe_dump(config))
    started_in = os.getcwd()
    os.chdir(folder)
    try:
        tunesmith.train("my.yaml")
    finally:
        os.chdir(started_in)
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_runs_config_names_its_files_absolutely_and_a_resume_still_matches(project, monkeypatch):
    run = project / "runs" / "mine"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["train"] == str(project / "tickets.csv")
    assert saved["output"]["dir"] == str(run)
    # The checkpoint's settings are the anchored ones: the user's relative config, run again from the
    # project folder, compares equal to them (a resume is not refused as "the config changed").
    state = json.loads(next((run / "checkpoints").glob("step-*/state.json")).read_text())
    monkeypatch.chdir(project)
    from tunesmith.training.checkpoint import DATA_KEY

    examples = state["settings"].pop(DATA_KEY)  # beside the settings: the training examples' count and digest
    assert state["settings"] == result_keys(anchored(load_config("my.yaml")))
    assert state["settings"]["data.train"] == str(project / "tickets.csv") and examples.endswith(tuple("0123456789abcdef"))


def test_every_local_path_is_anchored_for_the_run_and_named_only_by_its_last_part_on_a_card(tmp_path, monkeypatch):
    """The settings that name local files (setting_keys.PATH_SETTINGS): the run's config holds them absolute,
    hub ids and the built-in names stay as they are, and a model card shows none of the folders."""
    from tunesmith.config import Config
    from tunesmith.export.card import shown_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "base").mkdir()
    (tmp_path / "a.jsonl").write_text("")
    raw = {"model": {"name": "base"}, "output": {"dir": "runs/new"},
           "data": {"train": "a.jsonl", "test": "missing/t.jsonl", "validation": "someone/dataset",
                    "mix": {"a.jsonl": 1.0, "demo": 2.0}}}
    cfg = anchored(Config.model_validate(raw))
    assert cfg.model.name == str(tmp_path / "base")
    assert cfg.output.dir == str(tmp_path / "runs" / "new")  # not made yet, and looks like a hub id
    assert cfg.data.train == str(tmp_path / "a.jsonl")
    assert cfg.data.test == str(tmp_path / "missing" / "t.jsonl")  # its error later names where it was looked for
    assert cfg.data.validation == "someone/dataset"
    assert cfg.data.mix == {str(tmp_path / "a.jsonl"): 1.0, "demo": 2.0}
    hub = anchored(Config.model_validate({"model": {"name": "HuggingFaceTB/SmolLM2-135M"}}))
    assert hub.model.name == "HuggingFaceTB/SmolLM2-135M"
    card = yaml.safe_load(shown_config(cfg))
    assert str(tmp_path) not in shown_config(cfg)
    assert (card["model"]["name"], card["output"]["dir"], card["data"]["train"]) == ("base", "new", "a.jsonl")
    assert card["data"]["mix"] == {"a.jsonl": 1.0, "demo": 2.0}


def test_exports_check_prompts_are_the_runs_own_conversations_from_another_directory(project, elsewhere):
    from tunesmith.export.merge import sample_conversations

    conversations = sample_conversations(project / "runs" / "mine")
    assert len(conversations) == 8
    first = conversations[0]
    assert first[0] == {"role": "system", "content": SYSTEM}
    assert first[1]["content"].startswith("Ticket ") and first[2]["content"] in ("tech", "billing")


def test_compare_retrieves_from_the_runs_training_data_and_asks_both_models_with_its_system_prompt(
        project, elsewhere, tiny_model_dir):
    from helpers import write_jsonl
    from tunesmith.eval import baselines

    run = str(project / "runs" / "mine")
    test = write_jsonl(elsewhere / "test.jsonl", [{"question": f"Ticket {i}: screen dead", "answer": "tech"}
                                                  for i in range(3)])
    asked = []
    scored = baselines.score_prompts

    def recording(model, tokenizer, name, prompts, settings, layout=baselines.PADDED):
        asked.append((name, prompts))
        return scored(model, tokenizer, name, prompts, settings, layout)

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr("tunesmith.eval.compare.score_prompts", recording)
    try:
        result = baselines.compare_models(str(tiny_model_dir), run, str(test), max_new_tokens=2, batch_size=4,
                                          samples=50, names=("base", "tuned"), retrieval_k=1)
    finally:
        monkeypatch.undo()
    assert list(result["models"]) == ["base", "base + retrieval", "tuned + retrieval", "tuned"]
    for name, prompts in asked:
        assert all(p[0] == {"role": "system", "content": SYSTEM} for p in prompts), name
    retrieved = dict(asked)["tuned + retrieval"][0]
    # system, then the retrieved training example (CSV columns read as training read them), then the question
    assert retrieved[1]["content"].startswith("Ticket ") and retrieved[2]["content"] in ("tech", "billing")
    assert retrieved[-1]["content"] == "tech" and len(retrieved) == 5


def test_compare_asks_the_runs_own_base_with_the_chat_template_the_run_trained_with(project, elsewhere,
                                                                                   tiny_model_dir, monkeypatch):
    """The base, named as A, was asked with its own template while training's own comparison asked it with
    the run's (data.chat_template, or data.template_variables such as Qwen3's enable_thinking=false)."""
    import shutil

    from helpers import write_jsonl
    from tunesmith.eval import baselines
    from tunesmith.runs import RunFolder

    run = elsewhere / "marked"
    shutil.copytree(project / "runs" / "mine", run)
    template = RunFolder(run).trained() / "chat_template.jinja"
    template.write_text("{# trained like this #}" + template.read_text())
    test = write_jsonl(elsewhere / "test.jsonl", [{"question": "Ticket 1: screen dead", "answer": "tech"}])
    templates = {}
    scored = baselines.score_prompts

    def recording(model, tokenizer, name, prompts, settings, layout=baselines.PADDED):
        templates[name] = tokenizer.chat_template
        return scored(model, tokenizer, name, prompts, settings, layout)

    monkeypatch.setattr("tunesmith.eval.compare.score_prompts", recording)
    baselines.compare_models(str(tiny_model_dir), str(run), str(test), max_new_tokens=2, samples=20,
                             names=("base", "tuned"))
    assert "trained like this" in templates["base"] and "trained like this" in templates["tuned"]
    templates.clear()  # the other way round: the base as B
    baselines.compare_models(str(run), str(tiny_model_dir), str(test), max_new_tokens=2, samples=20,
                             names=("tuned", "base"))
    assert "trained like this" in templates["base"]


def test_chat_and_eval_ask_a_run_with_its_system_prompt_unless_told_otherwise(project, elsewhere, tiny_model_dir,
                                                                            monkeypatch):
    import io

    import tunesmith.measure as measure
    from helpers import write_jsonl
    from tunesmith.eval.chat import opening

    run = str(project / "runs" / "mine")
    told = io.StringIO()
    assert opening(run, None, told) == [{"role": "system", "content": SYSTEM}]
    assert "the one the run trained with" in told.getvalue()
    assert opening(run, "", told) == []
    assert opening(run, "Be brief.", told) == [{"role": "system", "content": "Be brief."}]
    assert opening(str(tiny_model_dir), None, told) == []

    seen = []
    eval_file = measure.eval_file
    monkeypatch.setattr(measure, "eval_file", lambda spec, tokenizer, cfg, limit: seen.append(cfg.system_prompt)
                        or eval_file(spec, tokenizer, cfg, limit))
    data = write_jsonl(elsewhere / "d.jsonl", [{"question": "Ticket: screen dead", "answer": "tech"}] * 2)
    measure.evaluate(run, str(data), max_new_tokens=2)
    measure.evaluate(str(tiny_model_dir), str(data), max_new_tokens=2)
    assert seen == [SYSTEM, None]


def test_pairs_sample_a_run_with_its_system_prompt(project, elsewhere, monkeypatch):
    import tunesmith.data.prompts as prompts_module
    from helpers import write_jsonl
    from tunesmith.pairs import make_pairs

    asked = []
    encode = prompts_module.encode_prompts
    monkeypatch.setattr(prompts_module, "encode_prompts", lambda tokenizer, prompts: asked.extend(prompts) or
                        encode(tokenizer, prompts))
    prompts = write_jsonl(elsewhere / "prompts.jsonl", [{"prompt": f"Ticket {i}: screen dead", "reference": "tech"}
                                                        for i in range(2)])
    (elsewhere / "exact.py").write_text("def score(answer, reference):\n    return float(answer == reference)\n")
    make_pairs(str(project / "runs" / "mine"), str(prompts), samples=2, out=str(elsewhere / "pairs.jsonl"),
               max_new_tokens=2, scorer=f"{elsewhere / 'exact.py'}:score", chosen="reference")  # a pair whatever is sampled
    assert len(asked) == 2 and all(p[0] == {"role": "system", "content": SYSTEM} for p in asked)


def test_a_runs_system_prompt_is_else_the_one_its_training_conversations_all_start_with(tmp_path):
    """The demo's data carries its system prompt in every conversation (no data.system_prompt)."""
    from helpers import write_jsonl
    from tunesmith.config import dump, load_config
    from tunesmith.runs import system_prompt_of

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "config.yaml").write_text(dump(load_config(None, ["data.train=demo"])))
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    shared = [{"messages": [{"role": "system", "content": "Triage."}, *turns]}] * 3
    write_jsonl(run / "data" / "train.jsonl", shared)
    assert system_prompt_of(str(run)) == "Triage."
    write_jsonl(run / "data" / "train.jsonl", shared + [{"messages": turns}])
    assert system_prompt_of(str(run)) is None
    assert system_prompt_of(str(tmp_path)) is None  # not a run


def test_a_checkpoint_that_holds_paths_as_typed_still_resumes_from_the_folder_it_was_trained_in(
        project, tmp_path, monkeypatch):
    """Checkpoints from before paths were recorded absolute hold data.train as the user typed it."""
    import shutil

    from tunesmith.errors import UserError
    from tunesmith.training.checkpoint import DATA_KEY, check_same_settings

    old = tmp_path / "step-2"
    shutil.copytree(next((project / "runs" / "mine" / "checkpoints").glob("step-*")), old)
    state = json.loads((old / "state.json").read_text())
    state["settings"]["data.train"] = "tickets.csv"
    (old / "state.json").write_text(json.dumps(state))
    monkeypatch.chdir(project)
    settings = {**result_keys(anchored(load_config("my.yaml"))), DATA_KEY: state["settings"][DATA_KEY]}
    check_same_settings(old, settings)  # the same file: resumes
    with pytest.raises(UserError, match=r"the config changed since this checkpoint, in train.lr"):
        check_same_settings(old, {**settings, "train.lr": 1.0})
    monkeypatch.chdir(tmp_path)  # elsewhere, the typed path names another (missing) file
    with pytest.raises(UserError, match=r"in data.train \('tickets.csv' -> "):
        check_same_settings(old, settings)


@pytest.mark.parametrize("objective,records,expected", [
    ("dpo", [{"prompt": "Q1", "chosen": "good 1", "rejected": "bad 1"},
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"}],
              "chosen": [{"role": "assistant", "content": "good 2"}], "rejected": "bad 2"}],
     [[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "good 1"}],
      [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q2"},
       {"role": "assistant", "content": "good 2"}]]),
    ("kto", [{"prompt": "Q1", "completion": "good 1", "label": True},
             {"prompt": "Q2", "completion": "bad 2", "label": False}],
     [[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "good 1"}]]),
    ("grpo", [{"prompt": "Q1", "reference": "ref 1"}, {"prompt": "Q2"}],
     [[{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "ref 1"}]]),
])
def test_a_preference_or_reward_run_is_read_by_its_good_answers(tmp_path, objective, records, expected):
    """Export's check prompts and compare's shots come from the run's data: pairs, KTO answers and
    GRPO prompts are read as their training reads them, each with a good answer (they were read as
    SFT records, found none, and export and `compare --kshot` of such a run failed)."""
    from tunesmith.eval.compare import training_conversations
    from tunesmith.export.merge import sample_conversations

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train": str(data)}, "train": {"objective": objective},
                                                     "output": {"dir": str(run)}}))
    assert training_conversations(str(run)) == expected
    assert sample_conversations(run) == expected  # no validation file: the training data's


def test_eval_limit_applies_to_the_loss_too_and_the_merged_adapter_scores_as_the_unmerged(project, elsewhere):
    """`tunesmith eval RUN --data F --limit N`: the loss of the first N examples, as the answers are
    (it ran over the whole file: a minute for 16 answers of the demo's 200 tickets), computed with
    the LoRA weights folded into the base (a third faster on a CPU) and equal to the adapter's own."""
    import tunesmith.measure as measure
    from helpers import write_jsonl
    from tunesmith.config import DataConfig
    from tunesmith.data.prepare import prepare
    from tunesmith.eval.loss import eval_loss
    from tunesmith.runs import load_trained

    run = str(project / "runs" / "mine")
    rows = [{"question": f"Ticket {i}: my {'screen' if i % 3 else 'invoice'} broke {'twice' * i}", "answer": "tech"}
            for i in range(6)]
    limited = measure.evaluate(run, str(write_jsonl(elsewhere / "all.jsonl", rows)), max_new_tokens=2, limit=2)
    first_two = measure.evaluate(run, str(write_jsonl(elsewhere / "two.jsonl", rows[:2])), max_new_tokens=2)
    whole = measure.evaluate(run, str(elsewhere / "all.jsonl"), max_new_tokens=2)
    assert limited["test_examples"] == 2 and limited["eval_loss"] == pytest.approx(first_two["eval_loss"], rel=1e-6)
    assert abs(whole["eval_loss"] - limited["eval_loss"]) > 1e-4  # the other four examples count there
    model, tokenizer, _ = load_trained(run)  # the adapter unmerged
    split = prepare(DataConfig(train=str(elsewhere / "all.jsonl"), validation=str(elsewhere / "all.jsonl"),
                               system_prompt=SYSTEM), tokenizer).splits["validation"]
    assert eval_loss(model, split, 16, tokenizer.pad_token_id) == pytest.approx(whole["eval_loss"], rel=1e-5)


def test_eval_of_a_run_without_data_scores_its_own_test_data(project, elsewhere, capsys):
    """`tunesmith eval RUN`: the test data the run was scored on, named; a run without one, and a
    model that is not a run, say what to give."""
    import shutil

    from helpers import write_jsonl
    from tunesmith.cli import main

    run = project / "runs" / "mine"
    assert main(["eval", str(run)]) == 2
    assert "the run had no test data (data.test); give --data FILE" in capsys.readouterr().err
    copy = elsewhere / "with-test"
    shutil.copytree(run, copy)
    test = write_jsonl(elsewhere / "test.jsonl", [{"question": "Ticket 7: my screen is wrong", "answer": "tech"}] * 3)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["test"], config["eval"]["scorer"] = str(test), "my_metrics:score"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["eval", str(copy), "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert f"eval: the run's own test data, {test}" in captured.err
    assert "add --scorer my_metrics:score" in captured.err  # never imported unless asked for
    own = json.loads(captured.out)
    assert main(["eval", str(copy), "--data", str(test), "--max-new-tokens", "2"]) == 0
    given = json.loads(capsys.readouterr().out)
    speed = "generated_tokens_per_second"
    assert {k: v for k, v in given.items() if k != speed} == {k: v for k, v in own.items() if k != speed}
    assert main(["eval", str(elsewhere / "test.jsonl")]) == 2
    assert "eval: give --data FILE, --general, or both" in capsys.readouterr().err


def test_eval_reads_a_runs_files_as_the_run_read_its_data(project, elsewhere):
    """`tunesmith eval RUN --data F` (or its own test data): F in the run's own columns (data.columns
    ticket/team here) was refused as of an unknown format: eval read it with the default data settings."""
    import tunesmith.measure as measure

    with open(elsewhere / "held_out.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ticket", "team"])
        writer.writerows([[f"Ticket {i}: my screen is wrong", "tech"] for i in range(3)])
    scored = measure.evaluate(str(project / "runs" / "mine"), str(elsewhere / "held_out.csv"), max_new_tokens=2)
    assert scored["test_examples"] == 3 and scored["eval_loss"] > 0


def test_eval_of_a_run_repeats_the_figures_its_training_recorded(project, elsewhere, tiny_model_dir, capsys):
    """`tunesmith eval RUN` scored the whole test split at 96 tokens in batches of 16, whatever the run's
    eval section said: its figures were not the run's (30 of 200 demo tickets at 40 tokens in training,
    all_fields 0.533 vs 0.500). Now the options not given are the run's; given ones win."""
    from helpers import write_jsonl
    from tunesmith.cli import main

    test = write_jsonl(elsewhere / "test.jsonl", [{"question": f"Ticket {i}: my {w} is wrong", "answer": a}
                                                  for i, (w, a) in enumerate([("screen", "tech"), ("bill", "billing")] * 3)])
    config = yaml.safe_load((project / "my.yaml").read_text())
    config["data"].update(train=str(project / "tickets.csv"), test=str(test))
    config["eval"] = {"generate": True, "compare_base": False, "test_limit": 4, "max_new_tokens": 3, "batch_size": 3,
                      "no_repeat_ngram_size": 2}
    config["output"]["dir"] = str(elsewhere / "scored")
    tunesmith.train(config)
    recorded = json.loads((elsewhere / "scored" / "results.json").read_text())["fine_tuned"]
    capsys.readouterr()
    assert main(["eval", str(elsewhere / "scored")]) == 0
    captured = capsys.readouterr()
    assert "max_new_tokens 3, batch_size 3" in captured.err and "test_limit 4" in captured.err
    again = json.loads(captured.out)
    generated = {k for k in recorded if k not in ("eval_loss", "answer_loss", "generated_tokens_per_second")}
    assert again["test_examples"] == 4 and {k: again[k] for k in generated} == {k: recorded[k] for k in generated}
    assert main(["eval", str(elsewhere / "scored"), "--limit", "6", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["test_examples"] == 6 and "test_limit" not in captured.err
    # compare: B's decoding settings too (96 tokens before), on the whole file given
    assert main(["compare", str(tiny_model_dir), str(elsewhere / "scored"), "--data", str(test)]) == 0
    told = capsys.readouterr().err
    assert "compare: scored as" in told and "max_new_tokens 3, batch_size 3" in told and "test_limit" not in told
    assert main(["compare", str(tiny_model_dir), str(elsewhere / "scored"), "--data", str(test), "--temperature", "0",
                 "--max-new-tokens", "2", "--batch-size", "2", "--seed", "0", "--repetition-penalty", "1",
                 "--no-repeat-ngram-size", "0"]) == 0
    assert "scored as" not in capsys.readouterr().err  # every option given: nothing taken from the run
