"""`tunesmith choose` ranks base models of known quality and lists those that do not fit;
`tunesmith curve` trains on nested, seeded fractions of the data."""
import json
import math
import re
from pathlib import Path

import pytest

from tunesmith.api import train
from tunesmith.choose import choose, format_choice
from tunesmith.curve import curve, format_curve, nested_fractions
from tunesmith.errors import UserError

from helpers import write_jsonl


def test_fractions_are_nested_seeded_and_sized():
    subsets = nested_fractions(40, [1, 0.25, 0.5], seed=3)
    assert [len(s) for s in subsets] == [10, 20, 40]
    assert set(subsets[0]) < set(subsets[1]) < set(subsets[2]) == set(range(40))
    assert subsets == nested_fractions(40, [0.25, 0.5, 1], seed=3)  # seeded: the same sets again
    assert subsets[0] != nested_fractions(40, [0.25, 0.5, 1], seed=4)[0]
    assert nested_fractions(3, [0.1], seed=0)[0] and len(nested_fractions(3, [0.1], seed=0)[0]) == 1
    with pytest.raises(UserError, match="fractions"):
        nested_fractions(10, [0, 1], seed=0)
    with pytest.raises(UserError, match="fractions"):
        nested_fractions(10, [1.5], seed=0)


def qa_config(tmp_path, model, **train_settings) -> str:
    rows = [{"question": f"Repeat the word {w} {i}", "answer": f"{w} {w} {i}"}
            for i, w in enumerate(["alpha", "beta", "gamma", "delta"] * 6)]
    config = {"model": {"name": str(model), "dtype": "float32"},
              "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows[:16])),
                       "validation": str(write_jsonl(tmp_path / "validation.jsonl", rows[16:])), "max_seq_len": 64},
              "adapter": {"method": "full"},
              "train": {"max_steps": 16, "batch_size": 4, "lr": 3e-3, "warmup_ratio": 0.0, **train_settings},
              "eval": {"generate": False, "max_new_tokens": 6, "batch_size": 8}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_choose_ranks_the_better_model_first_and_lists_what_does_not_fit(tiny_model_dir, tmp_path):
    config = qa_config(tmp_path, tiny_model_dir)
    # The better candidate: the tiny model fully fine-tuned on the task (its model/ folder is a plain HF model).
    train(config, [f"output.dir={tmp_path / 'tuned'}"])
    good = tmp_path / "tuned" / "model"
    result = choose(config, [str(tiny_model_dir), str(good), "llama-3.1-70b"], memory_gib=24, retrieval_k=1,
                    out=str(tmp_path / "choose"), samples=300)
    ranking = result["ranking"]
    assert [r["model"] for r in ranking] == [str(good), str(tiny_model_dir)]
    assert set(ranking[0]["settings"]) == {"zero-shot", "retrieval"}
    versus = ranking[0]["versus_next"]
    assert versus["next"] == str(tiny_model_dir) and versus["metric"] == "answer_loss_per_char"
    assert versus["high"] < 0 and versus["win"] == result["examples"] == 8  # lower loss on every example
    [unfit] = result["not_fitting"]
    assert unfit["model"] == "llama-3.1-70b" and unfit["planned_memory"] > 24 * 2**30
    text = format_choice(result)
    assert "1. " + str(good) in text and "llama-3.1-70b: does not fit" in text and "not loaded" in text
    ranking[0]["epoch_seconds"] = 22.4  # where the device's speed is known: as `plan` says it (it was "0 min")
    assert re.search(r"\d GiB, epoch 22 s\]", format_choice(result))
    assert (tmp_path / "choose" / "choose.png").stat().st_size > 0
    assert json.loads((tmp_path / "choose" / "choose.json").read_text())["ranking"][0]["model"] == str(good)


@pytest.mark.long  # a short fine-tune per candidate (a minute): `make test-slow` runs it, .ci/run does not
def test_choose_with_a_fine_tuning_budget(tiny_model_dir, tmp_path):
    config = qa_config(tmp_path, tiny_model_dir)
    result = choose(config, [str(tiny_model_dir)], memory_gib=24, retrieval_k=0, budget_tokens=600,
                    out=str(tmp_path / "choose"), samples=200)
    [row] = result["ranking"]
    assert set(row["settings"]) == {"zero-shot", "fine-tuned"}
    assert row["settings"]["fine-tuned"]["answer_loss_per_char"] < row["settings"]["zero-shot"]["answer_loss_per_char"]
    from tunesmith.choose import folder_name

    from tunesmith.config import load_config
    from tunesmith.data.prepare import prepare
    from tunesmith.models import load_tokenizer

    steps = json.loads((tmp_path / "choose" / f"01-{folder_name(str(tiny_model_dir))}" / "results.json").read_text())["steps"]
    train_split = prepare(load_config(config).data, load_tokenizer(str(tiny_model_dir))).splits["train"]
    # batch 4 of the training examples' mean length: about the budget's 600 tokens in all
    assert steps == math.ceil(600 / (4 * train_split.tokens / len(train_split))) > 1
    with pytest.raises(UserError, match="rank-by"):
        choose(config, [str(tiny_model_dir)], memory_gib=24, retrieval_k=0, rank_by="nope",
               out=str(tmp_path / "c2"), samples=50)


@pytest.mark.slow  # two training runs; the fractions themselves are tested above
def test_curve_trains_nested_fractions_at_equal_steps_per_example(tiny_model_dir, tmp_path):
    config = qa_config(tmp_path, tiny_model_dir)
    result = curve(config, [0.5, 1.0], out=str(tmp_path / "curve"), seed=1, samples=200)
    first, second = result["points"]
    assert (first["examples"], second["examples"]) == (8, 16) and (first["steps"], second["steps"]) == (8, 16)
    assert (first["trained"], second["trained"]) == (8, 16)  # nothing dropped: every example trained
    assert result["held_out"] == "validation" and result["held_out_examples"] == 8
    assert result["metric"] == "answer_loss"
    small = {json.dumps(json.loads(line)) for line in open(tmp_path / "curve" / "train-0.5.jsonl")}
    large = {json.dumps(json.loads(line)) for line in open(tmp_path / "curve" / "train-1.jsonl")}
    assert len(small) == 8 and small < large
    interval = second["intervals"]["answer_loss"]
    assert interval["low"] <= interval["mean"] <= interval["high"]
    [change] = [d for d in second["change"] if d["metric"] == "answer_loss"]
    assert change["win"] + change["tie"] + change["loss"] == 8
    assert "change" in format_curve(result) and (tmp_path / "curve" / "curve.png").stat().st_size > 0


def test_the_loss_per_character_is_the_answers_summed_loss_over_its_characters():
    """answer_loss is per answer token; per character it is loss * tokens / characters of the reference,
    which tokenizers of different vocabularies agree on: 2.0 * 3 / 6 = 1.0 and 1.5 * 4 / 3 = 2.0."""
    from tunesmith.choose import add_loss_per_char
    from tunesmith.eval.compare import PER_CHAR, Scored

    row = Scored("m", ["", ""], [{"answer_loss": 2.0}, {"answer_loss": 1.5}], [3, 4], references=["abcdef", "abc"])
    add_loss_per_char(row)
    assert [r[PER_CHAR] for r in row.rows] == [1.0, 2.0]


def test_candidates_rank_best_first_whichever_way_the_metric_points():
    """A score ranks the highest first, a loss the lowest, each by the candidate's last setting
    (retrieval here, not zero-shot)."""
    from tunesmith.choose import rank, rank_key
    from tunesmith.eval.compare import Scored

    def candidate(name, rouge, loss):
        rows = lambda r: [{"rouge_l": r + d, "answer_loss_per_char": loss + d} for d in (0.0, 0.01, 0.02)]  # noqa: E731
        return {"model": name, "planned_memory": 1, "device_memory": 2, "fits": True, "epoch_seconds": None,
                "device_name": "cpu", "scored": {"zero-shot": Scored(name, [""] * 3, rows(0.0)),
                                                 "retrieval": Scored(name, [""] * 3, rows(rouge))}}

    low, high = candidate("low", 0.2, 0.5), candidate("high", 0.6, 0.9)
    assert rank_key(high, "rouge_l") == pytest.approx(-0.61)  # the mean of 0.6, 0.61, 0.62, negated
    assert rank_key(high, "answer_loss_per_char") == pytest.approx(0.91)
    by_score = rank([low, high], "rouge_l", samples=50, seed=0)["ranking"]
    assert [r["model"] for r in by_score] == ["high", "low"]
    assert by_score[0]["versus_next"]["difference"] == pytest.approx(0.4)  # high - low
    by_loss = rank([low, high], "answer_loss_per_char", samples=50, seed=0)["ranking"]
    assert [r["model"] for r in by_loss] == ["low", "high"]


def test_a_fine_tuning_budget_is_cut_into_steps_of_the_configured_size(tiny_model_dir, tmp_path, monkeypatch):
    """--budget-tokens: steps = ceil(budget / (batch_size * grad_accum * tokens per example)), at least 1;
    batch 4 x accumulation 2 of 37.5-token examples is 300 tokens a step."""
    import tunesmith.api as api
    from tunesmith.choose import _short_fine_tune
    from tunesmith.config import load_config

    cfg = load_config(qa_config(tmp_path, tiny_model_dir, grad_accum=2))
    asked = []
    monkeypatch.setattr(api, "train", lambda raw: asked.append(raw))
    for budget in (600, 601, 10):
        _short_fine_tune(cfg, "some/model", budget, 37.5, tmp_path / "run")
    assert [raw["train"]["max_steps"] for raw in asked] == [2, 3, 1]
    assert asked[0]["model"]["name"] == "some/model" and asked[0]["output"]["dir"] == str(tmp_path / "run")


def test_curve_scales_max_steps_with_each_fraction(tiny_model_dir, tmp_path, monkeypatch):
    """Equal steps per example: train.max_steps 16 on 16 examples gives 8 steps to the half and 16 to
    the whole (training and scoring are stand-ins here; the slow test above trains them); each is
    scored on eval.test_limit test examples (all 10 were scored)."""
    import tunesmith.api as api
    import tunesmith.curve as curves
    from tunesmith.eval.compare import Scored

    def conversation(i):
        return [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]

    monkeypatch.setattr(curves, "_splits", lambda cfg: ([conversation(i) for i in range(16)],
                                                        [conversation(i) for i in range(16, 20)],
                                                        [conversation(i) for i in range(20, 30)]))
    asked, scored = [], []

    def train(raw):
        asked.append(raw["train"]["max_steps"])
        return {"data": {"examples": {"train": 0}}, "steps": raw["train"]["max_steps"]}

    monkeypatch.setattr(api, "train", train)
    monkeypatch.setattr(curves, "_score", lambda run, held_out, cfg, generate: scored.append(len(held_out)) or Scored(
        run.name, [""] * 3, [{"answer_loss": 1.0 + 0.1 * i} for i in range(3)], [2] * 3))
    monkeypatch.setattr(curves, "plot", lambda result, target: target)
    result = curve(qa_config(tmp_path, tiny_model_dir), [0.5, 1.0], ["eval.test_limit=3"], out=str(tmp_path / "curve"),
                   seed=1, samples=50)
    assert asked == [8, 16] and [p["steps"] for p in result["points"]] == [8, 16]
    assert scored == [3, 3] and result["held_out_examples"] == 3  # eval.test_limit, as train and eval take it


def test_choose_plans_memory_and_time_on_a_named_device(tiny_model_dir, tmp_path):
    from tunesmith.choose import _plan
    from tunesmith.config import load_config

    cfg = load_config(qa_config(tmp_path, tiny_model_dir))
    found = _plan(cfg, str(tiny_model_dir), "a100-80gb", None, tokens=100_000)
    assert found["fits"] and found["device_name"].lower().startswith("a100") and found["epoch_seconds"] > 0
    big = _plan(cfg, "llama-3.1-70b", "t4", None)
    assert not big["fits"] and big["planned_memory"] > big["device_memory"]
    # Over the 90% a run keeps to but within the memory: tight, and still scored (scoring needs less)
    need = _plan(cfg, "llama-3.1-8b", None, 1000)["planned_memory"] / 2**30
    tight = _plan(cfg, "llama-3.1-8b", None, need / 0.95)
    assert tight["tight"] and tight["fits"] and 0.9 < tight["planned_memory"] / tight["device_memory"] < 1


def test_choose_refuses_a_damaged_run_folder_before_scoring_anything(tiny_model_dir, tmp_path, monkeypatch):
    """A run folder is a candidate as `model: RUN` is (tests/test_run_start.py), but one without its
    weights is refused before the first candidate is loaded (a run named third failed after minutes of
    scoring)."""
    import tunesmith.choose as chooser

    config = qa_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {name: default}\n")
    (run / "adapter" / "adapter_config.json").write_text("{}")
    monkeypatch.setattr(chooser, "_score_candidate", lambda *a, **k: pytest.fail("scored before the names were checked"))
    with pytest.raises(UserError, match=r"run/adapter: no weights"):
        choose(config, [str(tiny_model_dir), str(run)], memory_gib=24, out=str(tmp_path / "choose"))
    # A shape `plan` ships that fits is no model to score either (it failed with "cannot load tokenizer" after
    # the others); one that does not fit is only listed so.
    with pytest.raises(UserError, match=r"llama-3.1-8b is a shape `plan` ships.*meta-llama/Llama-3.1-8B"):
        choose(config, [str(tiny_model_dir), "llama-3.1-8b"], memory_gib=200, out=str(tmp_path / "choose"))


def test_choose_keeps_the_candidates_scored_before_a_failure(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import tunesmith.choose as chooser

    config = qa_config(tmp_path, tiny_model_dir)
    scored = []
    real = chooser._score_candidate

    def second_fails(cfg, spec, *rest):
        if scored:
            raise MemoryError("out of memory")
        scored.append(spec)
        return real(cfg, spec, *rest)

    monkeypatch.setattr(chooser, "_score_candidate", second_fails)
    with pytest.raises(MemoryError):
        choose(config, [str(tiny_model_dir), "default"], memory_gib=24, retrieval_k=0, out=str(tmp_path / "choose"),
               samples=50)
    kept = json.loads((tmp_path / "choose" / "choose.json").read_text())
    assert [r["model"] for r in kept["ranking"]] == [str(tiny_model_dir)] and kept["scored"] == "1 of 2"
    err = capsys.readouterr().err
    assert f"candidate 1/2: {tiny_model_dir}: planned" in err and "candidate 2/2: default: planned" in err
    assert "data: examples train 16, validation 8;" in err and "dropped: none" in err  # read once, said once


def spreadsheet_config(tmp_path, model, **train_settings) -> tuple[str, Path]:
    """qa_config's task in a user's own columns (Q, A) and format, with a broken line 4 and an over-long line 7."""
    config = qa_config(tmp_path, model, **train_settings)
    raw = json.loads(Path(config).read_text())
    rows = [{"Q": r["question"], "A": r["answer"]} for r in map(json.loads, open(raw["data"]["train"]))]
    rows[3:3] = ['{"Q": "broken']
    rows[6:6] = [{"Q": "long " * 100, "A": "x"}]
    train = write_jsonl(tmp_path / "mine.jsonl", rows)
    raw["data"].update(train=str(train), columns={"question": "Q", "answer": "A"}, format="question_answer",
                       validation=None)
    Path(config).write_text(json.dumps(raw))
    return config, train


def test_curve_reports_the_users_lines_and_takes_fractions_of_the_usable_examples(tiny_model_dir, tmp_path, capsys):
    from tunesmith.config import load_config
    from tunesmith.curve import _splits

    config, mine = spreadsheet_config(tmp_path, tiny_model_dir)
    train, validation, test = _splits(load_config(config))
    out = capsys.readouterr().err
    assert f"skipped {mine}:4: broken JSON" in out and f"skipped {mine}:7: longer than max_seq_len" in out
    assert len(train) + len(validation) == 16 and validation and test is None  # validation held out of the 16
    assert all(c[-1]["role"] == "assistant" and "long long" not in c[0]["content"] for c in train + validation)


def test_curve_keeps_the_fractions_measured_before_a_failure(tiny_model_dir, tmp_path, monkeypatch):
    import tunesmith.api as api

    config, _ = spreadsheet_config(tmp_path, tiny_model_dir, max_steps=2)
    real, calls = api.train, []

    def second_fails(raw, *rest):
        calls.append(raw)
        if len(calls) > 1:
            raise MemoryError("out of memory")
        return real(raw, *rest)

    monkeypatch.setattr(api, "train", second_fails)
    with pytest.raises(MemoryError):
        curve(config, [0.5, 1.0], out=str(tmp_path / "curve"), seed=1, samples=50)
    kept = json.loads((tmp_path / "curve" / "curve.json").read_text())
    [point] = kept["points"]
    # Every example of a fraction trains: the user's broken and over-long lines were left out before.
    assert point["fraction"] == 0.5 and point["examples"] == point["trained"] and kept["fractions_done"] == "1 of 2"


def test_choose_refuses_a_misspelt_rank_by_before_any_candidate_is_scored(tiny_model_dir, tmp_path, monkeypatch):
    """The metrics the validation examples can give are known from their references: a misspelt
    --rank-by was refused only after the first candidate's minutes of scoring."""
    import tunesmith.choose as chooser

    config = qa_config(tmp_path, tiny_model_dir)
    monkeypatch.setattr(chooser, "_score_candidate", lambda *a, **k: pytest.fail("scored before --rank-by was checked"))
    with pytest.raises(UserError, match=r"--rank-by rouge-l is not a metric .*answer_loss_per_char.*rouge_l"):
        choose(config, [str(tiny_model_dir)], memory_gib=24, rank_by="rouge-l", out=str(tmp_path / "choose"))
    with pytest.raises(UserError, match="--limit 0: score at least one"):  # 0 scored every example, -1 all but one
        choose(config, [str(tiny_model_dir)], memory_gib=24, limit=0, out=str(tmp_path / "choose"))


def test_candidates_of_the_same_name_train_into_their_own_folders():
    from tunesmith.choose import folder_name

    names = [f"{n:02d}-{folder_name(spec)}" for n, spec in enumerate(["org1/model", "org2/model", ".", ".."], 1)]
    assert len(set(names)) == 4 and folder_name("org1/model") != folder_name("org2/model")
    assert all("/" not in name and name.strip(".") == name for name in names)


def test_a_setting_without_the_ranking_metric_is_ranked_without_its_interval():
    """A scorer key that only the fine-tuned answers got: the other settings have no interval of it
    (a ValueError from the bootstrap before)."""
    from tunesmith.choose import rank
    from tunesmith.eval.compare import Scored

    rows = lambda key: [{"rouge_l": v, **({key: v} if key else {})} for v in (0.1, 0.4, 0.3)]  # noqa: E731
    entry = {"model": "m", "planned_memory": 1, "device_memory": 2, "fits": True, "epoch_seconds": None,
             "scored": {"zero-shot": Scored("zero-shot", ["a"] * 3, rows(None), [2] * 3),
                        "fine-tuned": Scored("fine-tuned", ["a"] * 3, rows("judge"), [2] * 3)}}
    [row] = rank([entry], "judge", 50, 0)["ranking"]
    assert list(row["intervals"]) == ["fine-tuned"]


def test_curve_keeps_declared_tools_and_curve_and_choose_take_sft_configs_only(tiny_model_dir, tmp_path):
    from tunesmith.curve import _write
    from tunesmith.data.prepare import load_conversations

    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    write_jsonl(tmp_path / "tools.jsonl", [{"tools": tools, "messages": [
        {"role": "user", "content": "Time?"}, {"role": "assistant", "content": "It is noon."}]}])
    read, problems = load_conversations(str(tmp_path / "tools.jsonl"), None)
    again, problems_again = load_conversations(_write(tmp_path / "written.jsonl", read), None)
    assert again == read and not problems and not problems_again
    config = qa_config(tmp_path, tiny_model_dir)
    for command, call in (("curve", lambda: curve(config, [1.0], ["train.objective=dpo"], out=str(tmp_path / "c"))),
                          ("choose", lambda: choose(config, [str(tiny_model_dir)], ["train.objective=dpo"],
                                                    out=str(tmp_path / "c")))):
        with pytest.raises(UserError, match=f"{command}: takes SFT runs .*train.objective=dpo"):
            call()


def test_curve_warns_of_leakage_once_naming_the_users_files(tiny_model_dir, tmp_path, capsys):
    """A test example that is also in train is reported against the user's test file and line; the
    fractions' runs read curve's copies of the files, and named those (runs/curve/test.jsonl:1) again."""
    config, mine = spreadsheet_config(tmp_path, tiny_model_dir, max_steps=1)
    raw = json.loads(Path(config).read_text())
    leaked = json.loads(Path(mine).read_text().splitlines()[0])
    test = write_jsonl(tmp_path / "mine_test.jsonl", [{"Q": "Repeat the word zeta", "A": "zeta zeta"}, leaked])
    raw["data"]["test"] = str(test)
    Path(config).write_text(json.dumps(raw))
    curve(config, [1.0], out=str(tmp_path / "curve"), seed=1, samples=50)
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "also in train" in line]
    assert len(warnings) == 1 and f"{test}:2" in warnings[0], warnings
    assert err.count("data: examples train") == 2  # the user's files, then the fraction's run


def test_choose_refuses_a_candidate_named_twice_before_reading_anything(tmp_path):
    with pytest.raises(UserError, match="default is named twice in --models"):
        choose(str(tmp_path / "no-such-config.yaml"), ["default", "x/y", "default"], out=str(tmp_path / "choose"))
    assert not (tmp_path / "choose").exists()
