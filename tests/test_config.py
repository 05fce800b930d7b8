import re

import pytest

from tunesmith.config import Config, field_docs, load_config, parse_overrides
from tunesmith.errors import UserError


def test_defaults_use_the_builtin_model_and_lora():
    cfg = load_config()
    assert cfg.model.name == "default"
    assert cfg.adapter.method == "lora" and cfg.adapter.target_modules == "all-linear"


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: 4\n  lr_rate: 0.1\n")
    with pytest.raises(UserError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown key 'train.lr_rate'" in message
    assert "did you mean 'train.lr'" in message
    assert f"{path}:3" in message  # the line of the bad key


def test_unknown_section_is_named():
    with pytest.raises(UserError, match="unknown key 'trian'; did you mean 'train'"):
        load_config(None, ["trian.lr=1"])


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  batch_size: many\n")
    with pytest.raises(UserError, match=r"c.yaml:2: train.batch_size: .*'many'"):
        load_config(path)


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: default\ntrain:\n  lr: 0.01\n")
    cfg = load_config(path, ["train.lr=1e-4", "adapter.r=4", "eval.generate=false", "model=some/hub-id"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.r == 4 and cfg.eval.generate is False
    assert cfg.model.name == "some/hub-id"
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


def test_an_override_replaces_a_mapping_keeps_the_model_named_and_a_hash(tmp_path):
    """`data.mix={}` switches the file's mixing off (it merged into it); `model.dtype=...` on `model: NAME`
    kept the name (it fell back to the default model); ` #` in a value is text, not a YAML comment."""
    path = tmp_path / "c.yaml"
    path.write_text("model: some/hub-id\ndata:\n  train: t.jsonl\n  mix: {extra.jsonl: 2}\n"
                    "  columns: {prompt: instruction, completion: output}\n")
    cfg = load_config(path, ["data.mix={}", "data.columns={question: Q, answer: A}", "model.dtype=float32",
                             "data.system_prompt=Answer as agent #7 would", "data.test=my data #2/test.jsonl"])
    assert cfg.data.mix == {} and cfg.data.columns == {"question": "Q", "answer": "A"}
    assert (cfg.model.name, cfg.model.dtype) == ("some/hub-id", "float32")
    assert cfg.data.system_prompt == "Answer as agent #7 would" and cfg.data.test == "my data #2/test.jsonl"
    assert load_config(path, ["data.columns.question=Q"]).data.columns == {  # dotted keys still merge
        "prompt": "instruction", "completion": "output", "question": "Q"}


@pytest.mark.parametrize("given,meant", [("train.learning_rate", "train.lr"), ("adapter.lora_r", "adapter.r"),
                                         ("train.gradient_accumulation_steps", "train.grad_accum"),
                                         ("data.max_seq_length", "data.max_seq_len"), ("output.output_dir", "output.dir")])
def test_other_tools_names_for_a_setting_suggest_tunesmiths(given, meant):
    """Names from transformers, peft, TRL or Axolotl got the list of every key of the section."""
    with pytest.raises(UserError, match=f"unknown key '{given}'; did you mean '{meant}'"):
        load_config(None, [f"{given}=1"])


def test_config_check_refuses_what_train_would_refuse_before_loading(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """`config --check` said "valid" for a config whose data file was not there."""
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "a"}\n')
    for body, said in ((f"model: {tiny_model_dir}\ndata:\n  train: train.jsonl\n", "c.yaml: valid"),
                       (f"model: {tiny_model_dir}\ndata:\n  train: nothere.jsonl\n", "nothere.jsonl: data file not found"),
                       ("model: ./no-model\ndata:\n  train: train.jsonl\n", "./no-model: model folder not found")):
        (tmp_path / "c.yaml").write_text(body)
        assert main(["config", "--check", "c.yaml"]) == (0 if said.endswith("valid") else 2)
        assert said in capsys.readouterr()[0 if said.endswith("valid") else 1]


def test_a_bad_override_is_blamed_on_the_command_line_not_the_files_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: default\ntrain:\n  lr: 0.01\n")
    for override, expected in (("train.lrr=1", "command line: unknown key 'train.lrr'; did you mean 'train.lr'"),
                               ("train.lr=abc", "command line: train.lr: ")):
        with pytest.raises(UserError) as err:
            load_config(path, [override])
        assert str(err.value).startswith(expected) and "c.yaml" not in str(err.value)
    path.write_text("model: default\ntrain:\n  lr: 0.01\n  lr_rate: 1\n")
    with pytest.raises(UserError, match=r"c.yaml:4: unknown key 'train.lr_rate'"):  # the file's own mistake
        load_config(path, ["train.lr=1e-4"])


def test_invalid_yaml_reports_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)


def test_a_key_given_twice_is_refused_where_yaml_would_keep_the_last(tmp_path):
    """YAML keeps the last of two equal keys silently; keys a `<<` merge brings in may still be overridden."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 0.1\n  max_steps: 1\neval: {every_steps: 2, every_steps: 3}\n")
    with pytest.raises(UserError, match=r"twice.yaml:4: .*'every_steps' is given twice \(first on line 4\)"):
        load_config(twice)
    merged = tmp_path / "merged.yaml"
    merged.write_text("train:\n  <<: {lr: 0.1, max_steps: 5}\n  lr: 0.2\n")
    cfg = load_config(merged)
    assert cfg.train.lr == 0.2 and cfg.train.max_steps == 5


def nested_aliases(levels: int) -> str:
    """A few hundred bytes of YAML whose aliases expand to 9**levels strings ("billion laughs")."""
    parts = ['&x0 ["aaaaaaaaaa", "aaaaaaaaaa", "aaaaaaaaaa"]']
    parts += [f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "[" + ", ".join(parts) + "]"


def test_yaml_whose_aliases_expand_without_end_is_refused_before_it_takes_the_memory(tmp_path):
    """A run folder or a settings line from someone else: 9**8 strings would take tens of GB."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(f"model:\n  name: {nested_aliases(8)}\n")
    assert bomb.stat().st_size < 1000
    with pytest.raises(UserError, match=r"bomb.yaml:\d+: not valid YAML \(more than 100,000 values \(its aliases expanded"):
        load_config(bomb)
    with pytest.raises(UserError, match=r"override 'model.name': more than 100,000 values"):
        parse_overrides([f"model.name={nested_aliases(8)}"])
    deep = tmp_path / "deep.yaml"
    deep.write_text("model: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(UserError, match="deep.yaml: not valid YAML \\(nested too deeply"):
        load_config(deep)
    # Aliases that expand to a config's size stay allowed, merge keys among them.
    shared = tmp_path / "shared.yaml"
    shared.write_text("x-common: &common {lr: 0.1, max_steps: 5}\ntrain:\n  <<: *common\n  lr: 0.2\n")
    with pytest.raises(UserError, match="unknown key 'x-common'"):  # read, then validated as usual
        load_config(shared)


def test_an_error_quoting_a_huge_value_is_cut_short():
    with pytest.raises(UserError) as caught:
        load_config(None, ["train.lr=[" + ", ".join(["1"] * 10_000) + "]"])
    assert len(str(caught.value)) < 1000 and "characters)" in str(caught.value)


def test_every_field_is_documented():
    docs = field_docs()
    assert len(docs) > 30
    assert all(text.strip() for text in docs.values()), [k for k, v in docs.items() if not v.strip()]


def test_shipped_configs_validate():
    from importlib import resources

    for entry in (resources.files("tunesmith") / "configs").iterdir():
        if entry.name.endswith(".yaml"):
            with resources.as_file(entry) as path:
                assert isinstance(load_config(path), Config)


def test_fsdp_with_a_4_bit_base_is_refused_before_anything_loads():
    """FSDP2 gathers a sharded 4-bit weight without its quantisation state: the run would fail in its first
    forward on every rank (seen on 2 gloo ranks), so the config says so first."""
    with pytest.raises(UserError, match="train.fsdp does not work with adapter.method: qlora"):
        load_config(None, ["adapter.method=qlora", "train.fsdp=true"])
    assert load_config(None, ["adapter.method=lora", "train.fsdp=true"]).train.fsdp


def test_a_generation_metric_for_the_best_weights_needs_single_answer_examples():
    with pytest.raises(UserError, match="eval.best_metric=rouge_l .* train.objective: dpo") as refused:
        load_config(None, ["train.objective=dpo", "eval.best_metric=rouge_l"])
    # a rule across settings reads as one sentence: no pydantic prefix, no dump of the whole config
    assert "Value error" not in str(refused.value) and "(got" not in str(refused.value)
    assert load_config(None, ["eval.best_metric=rouge_l"]).eval.best_metric == "rouge_l"


def test_overrides_after_an_option_join_the_others_in_order_and_a_mistyped_option_is_still_refused(
        tmp_path, capsys, monkeypatch):
    """`tunesmith train my.yaml --resume train.lr=1e-4`: argparse alone called the override unrecognized."""
    import tunesmith.api
    from tunesmith.cli import main

    called = []
    monkeypatch.setattr(tunesmith.api, "train", lambda config, overrides, must_resume: called.append(
        (overrides, must_resume)))
    assert main(["train", "my.yaml", "train.lr=1e-4", "--resume", "adapter.r=4", "train.lr=2e-4"]) == 0
    assert called == [(["train.lr=1e-4", "adapter.r=4", "train.lr=2e-4"], True)]  # in order: the last lr wins
    for stray in ("--resme", "lr"):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "my.yaml", "--resume", "train.lr=1e-4", stray])
        assert stopped.value.code == 2 and f"unrecognized arguments: {stray}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "train.lr=1"])  # a command that takes no overrides
    assert len(called) == 1


def test_fsdp_and_packing_with_another_objective_are_refused_with_the_config():
    """`train --nproc N` checks the config before it starts the ranks: each rank refused these at its
    start instead, after loading the model and data."""
    with pytest.raises(UserError, match="train.fsdp applies to train.objective: sft only, not dpo yet; use DDP"):
        load_config(None, ["train.objective=dpo", "train.fsdp=true"])
    with pytest.raises(UserError, match="data.packing applies to train.objective: sft only, not kto"):
        load_config(None, ["train.objective=kto", "data.packing=true"])
    assert load_config(None, ["train.fsdp=true", "data.packing=true"]).train.fsdp


@pytest.mark.parametrize("override, expected", [
    ("train.lr=.inf", "train.lr: Input should be a finite number"),  # trained to a NaN loss
    ("model.name=", "model.name: String should have at least 1 character"),  # loaded another model
    ("output.dir=", "output.dir: String should have at least 1 character"),  # the working folder as the run
    ("data.mix={a.jsonl: -1}", "data.mix.a.jsonl: Input should be greater than or equal to 0"),
    # the union's branch name ('list[str]') in the location blamed the config file's line
    ("adapter.target_modules=q_proj", "command line: adapter.target_modules: Input should be a valid list"),
])
def test_settings_that_passed_as_valid_and_misled_are_refused(override, expected):
    from tunesmith.config import load_config

    with pytest.raises(UserError, match=re.escape(expected)):
        load_config(None, [override])


def test_fast_paths_off_as_the_docs_write_it(tmp_path):
    """YAML reads a bare `off` as false: `train.fast_paths=off` and `fast_paths: off` were refused."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  fast_paths: off\n")
    assert load_config(path).train.fast_paths == "off"
    assert load_config(None, ["train.fast_paths=off"]).train.fast_paths == "off"
    assert load_config(None, ["train.fast_paths=auto"]).train.fast_paths == "auto"
    with pytest.raises(UserError, match="fast_paths"):
        load_config(None, ["train.fast_paths=fast"])


def test_patience_without_evaluations_during_training_is_refused(tmp_path):
    """eval.patience with eval.every_steps 0 (the default) was valid and did nothing."""
    from tunesmith.api import check_config

    config = tmp_path / "c.yaml"
    config.write_text("data: {train: demo}\n")
    with pytest.raises(UserError, match="eval.patience=2 counts evaluations during training.*eval.every_steps"):
        check_config(str(config), ["eval.patience=2"])
    assert check_config(str(config), ["eval.patience=2", "eval.every_steps=10"]).eval.patience == 2
    assert load_config(None, ["eval.patience=2"]).eval.patience == 2  # a run folder of before the rule still reads


def test_an_override_starting_with_a_yaml_tag_stays_text():
    """Only tunesmith's own refusals (a key twice, aliases without end) stop an override's value; other
    YAML trouble keeps the text as written, as before (`!important be brief`)."""
    assert parse_overrides(["data.system_prompt=!important be brief"]) == {"data": {"system_prompt": "!important be brief"}}
    with pytest.raises(UserError, match="override 'data.mix': 'a' is given twice"):
        parse_overrides(["data.mix={a: 1, a: 2}"])
