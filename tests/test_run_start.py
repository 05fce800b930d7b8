"""`model: RUN` (a run started from an earlier run): plan and data check take the run folder as train
does, without merging; and the new run is refused, not silently put on another model, once the earlier
run it trained on was trained again or is gone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import tunesmith
from helpers import qa_rows, write_jsonl
from tunesmith.errors import UserError
from tunesmith.runs import load_trained


def run_config(model: Path, out: Path, data: Path, **train) -> dict:
    return {"model": {"name": str(model), "dtype": "float32"},
            "data": {"train": str(data), "max_seq_len": 96},
            "adapter": {"r": 4}, "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, **train},
            "eval": {"generate": False, "report": False}, "output": {"dir": str(out)}}


def trained_sft(model: Path, folder: Path) -> Path:
    tunesmith.train(run_config(model, folder / "sft", write_jsonl(folder / "sft.jsonl", qa_rows(16))))
    return folder / "sft"


@pytest.fixture
def sft_run(tiny_model_dir, tmp_path) -> Path:
    return trained_sft(tiny_model_dir, tmp_path)


@pytest.fixture(scope="module")
def kept_sft_run(tiny_model_dir, tmp_path_factory) -> Path:
    """An SFT run the tests only read."""
    return trained_sft(tiny_model_dir, tmp_path_factory.mktemp("kept"))


def pairs_file(path: Path) -> Path:
    rows = qa_rows(8)
    return write_jsonl(path, [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": rows[i - 1]["completion"]}
                              for i, r in enumerate(rows)])


def test_plan_takes_a_run_folder_as_the_model_without_merging_it(kept_sft_run, tiny_model_dir, tmp_path):
    """It went to the model loader, which refused the folder ('a run folder with a LoRA adapter, not a whole
    model'), though train merges it and goes on; the plan needs its base's shape and its tokenizer only."""
    from tunesmith.plan import plan_for

    config = run_config(kept_sft_run, tmp_path / "dpo", pairs_file(tmp_path / "pairs.jsonl"), objective="dpo")
    (tmp_path / "dpo.json").write_text(json.dumps(config))
    planned = plan_for(str(tmp_path / "dpo.json"), include_this_machine=False)
    base = plan_for(str(tmp_path / "dpo.json"), [f"model.name={tiny_model_dir}"], include_this_machine=False)
    assert planned.shape.name == str(kept_sft_run) and planned.shape.total_params == base.shape.total_params
    assert planned.drawn and planned.tokens == base.tokens  # the run's data, read with its tokenizer
    assert not (kept_sft_run / "export").exists()  # nothing merged or written into the run folder


def test_data_check_takes_a_run_folder_as_the_model_with_the_tokenizer_it_trained_with(kept_sft_run, tiny_model_dir,
                                                                                       tmp_path):
    """Refused as for plan, with '(read as pairs data from the first record's fields; ...)' added."""
    from tunesmith.data.check import check_data

    pairs = pairs_file(tmp_path / "pairs.jsonl")
    report = check_data(str(pairs), str(kept_sft_run), tmp_path / "check")
    same = check_data(str(pairs), str(tiny_model_dir), tmp_path / "check-base")  # the tokenizer the run kept
    assert report["model"] == str(kept_sft_run) and report["formats"] == same["formats"]
    assert report["examples"] == same["examples"] and report["tokens"] == same["tokens"] > 0
    assert not (kept_sft_run / "export").exists()


def test_the_dashboards_preview_takes_a_run_folder_as_the_model(kept_sft_run, tiny_model_dir, tmp_path):
    """The preview refused it ('a run folder with a LoRA adapter, not a whole model'); Start then trained it."""
    from tunesmith.ui.launch import preview

    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(12))
    form = {"name": "next", "model": str(kept_sft_run), "train": str(data), "max_steps": "2", "max_seq_len": "96",
            "extra": "model.dtype=float32"}
    shown = preview(form, tmp_path / "runs")
    same = preview({**form, "model": str(tiny_model_dir)}, tmp_path / "runs")  # the tokenizer the run kept
    assert shown["data_check"]["examples"] == same["data_check"]["examples"] and shown["plan"] == same["plan"]
    assert "no estimate" not in shown["plan_text"] and "peak" in shown["plan_text"]
    assert not (kept_sft_run / "export").exists()  # nothing merged to show a preview


def test_choose_and_curve_take_a_run_folder_as_the_model_as_train_does(sft_run, tiny_model_dir, tmp_path):
    """Both refused it ('a run folder with a LoRA adapter, not a whole model; export it'), though a run
    started from it merges it and goes on. choose scores the merged model (the start such a run has)."""
    from tunesmith.choose import choose
    from tunesmith.curve import _splits
    from tunesmith.config import load_config

    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(24))
    config = run_config(sft_run, tmp_path / "next", data)
    (tmp_path / "next.json").write_text(json.dumps(config))
    found = choose(str(tmp_path / "next.json"), [str(sft_run), str(tiny_model_dir)], memory_gib=24, limit=3,
                   retrieval_k=0, out=str(tmp_path / "choose"), samples=50)
    scores = {row["model"]: row["settings"]["zero-shot"]["answer_loss"] for row in found["ranking"]}
    assert set(scores) == {str(sft_run), str(tiny_model_dir)} and scores[str(sft_run)] != scores[str(tiny_model_dir)]
    assert (sft_run / "export" / "merged" / "config.json").is_file()  # what a run started from it trains on
    base = load_config(str(tmp_path / "next.json"), [f"model.name={tiny_model_dir}"])
    assert _splits(load_config(str(tmp_path / "next.json"))) == _splits(base)  # read with the tokenizer it kept


def test_a_run_started_from_a_run_is_refused_once_that_run_is_trained_again(sft_run, tiny_model_dir, tmp_path):
    """The new run's adapter names RUN/export/merged as its base; RUN trained again and merged again
    gave it another base, and eval scored that without a word (5.990 before, 6.043 after)."""
    from tunesmith.start import starting_model

    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(12))
    config = run_config(sft_run, tmp_path / "dep", data, checkpoint_every=1)
    tunesmith.train(config)
    load_trained(str(tmp_path / "dep"))  # on the base it trained on

    retrain = run_config(tiny_model_dir, sft_run, data, lr=5e-2)
    retrain["output"]["overwrite"] = True
    tunesmith.train(retrain)
    starting_model(str(sft_run))  # merged again, as any run started from it does
    with pytest.raises(UserError, match=r"dep: trained on the model of run .*sft .*was trained again since"):
        load_trained(str(tmp_path / "dep"))
    import tunesmith.eval.baselines as baselines
    from tunesmith.measure import compare

    def scored(*args, **kwargs):  # compare generated all of A's answers, then refused B
        raise AssertionError("A scored before B was refused")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(baselines, "compare_models", scored)
        with pytest.raises(UserError, match="was trained again since"):
            compare(str(tiny_model_dir), str(tmp_path / "dep"), str(data))

    # A resume (the run stopped before its end) is refused too, before it trains on the new base, and
    # before it merges that base (it merged the retrained adapter, then refused).
    (tmp_path / "dep" / "results.json").unlink()
    shutil.rmtree(tmp_path / "dep" / "adapter")
    shutil.rmtree(sft_run / "export")
    with pytest.raises(UserError, match="was trained again since"):
        tunesmith.train(config)
    assert not (sft_run / "export").exists()


def test_a_started_runs_base_gone_is_said_and_a_run_without_a_record_loads_as_before(sft_run, tmp_path):
    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(12))
    tunesmith.train(run_config(sft_run, tmp_path / "dep", data))
    shutil.rmtree(sft_run / "export")
    with pytest.raises(UserError, match=r"which is no longer there; `tunesmith export .*sft --format hf` writes it"):
        load_trained(str(tmp_path / "dep"))
    tunesmith.train(run_config(sft_run, tmp_path / "other", data))  # merges it again
    load_trained(str(tmp_path / "dep"))  # the same adapter merged again: the same base

    shutil.move(sft_run, tmp_path / "moved")
    with pytest.raises(UserError, match=r"sft \(.*\), which is no longer there; train .*dep again .*or restore .*sft as it was"):
        load_trained(str(tmp_path / "dep"))
    shutil.move(tmp_path / "moved", sft_run)
    adapter = sft_run / "adapter" / "adapter_model.safetensors"
    os.utime(adapter, ns=(adapter.stat().st_atime_ns, adapter.stat().st_mtime_ns + 1))  # rewritten, as by training
    with pytest.raises(UserError, match="was trained again since"):
        load_trained(str(tmp_path / "dep"))
    (tmp_path / "dep" / "started_from.json").unlink()  # a run folder written before the record existed
    load_trained(str(tmp_path / "dep"))


def test_a_resume_merges_again_an_unchanged_earlier_run_whose_merge_was_removed(sft_run, tmp_path):
    """Judged before the merge, a resume was refused as 'trained on ... export/merged, which is no longer
    there', though the adapter it was merged from is unchanged and the start merges it again."""
    data = write_jsonl(tmp_path / "more.jsonl", qa_rows(12))
    config = run_config(sft_run, tmp_path / "dep", data, checkpoint_every=1)
    tunesmith.train(config)
    (tmp_path / "dep" / "results.json").unlink()  # stopped before its end
    shutil.rmtree(tmp_path / "dep" / "adapter")
    shutil.rmtree(sft_run / "export")
    assert tunesmith.train(config)["resumed_from"] is not None
    load_trained(str(tmp_path / "dep"))  # on the same base, merged again
