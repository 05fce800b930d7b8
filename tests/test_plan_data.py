"""`tunesmith plan CONFIG` plans the run's own micro-batches, as `train` does at its start."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest

import tunesmith
from helpers import write_config
from tunesmith.config import validate
from tunesmith.plan import format_plan, plan_for
from tunesmith.plan.shapes import model_shape


def this_machine(found):
    return next(fit for fit in found.fits if fit.device.is_cpu)


def test_plan_of_a_config_predicts_what_train_predicts_at_its_start(tiny_model_dir, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's estimate, also on a GPU host
    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=2, checkpoint_every=0)
    settings = json.loads(config.read_text())
    settings["data"]["max_seq_len"] = 512  # a step's 8 short questions fill a fraction of 4 x 512 tokens
    config.write_text(json.dumps(settings))
    results = tunesmith.train(str(config))
    found = plan_for(str(config))
    assert found.drawn and found.setup.tokens  # the tiny model is a Llama: padding-free rows
    assert this_machine(found).estimate.total == pytest.approx(results["peak_memory"]["predicted"], rel=1e-9)
    assert "the data's largest micro-batch" in format_plan(found)
    assert found.setup.tokens < 4 * 512 / 2
    # Named sizes plan every sequence at that length.
    worst = plan_for(str(config), seq=512, batch=4)
    assert not worst.drawn and (worst.setup.batch, worst.setup.seq) == (4, 512)
    assert this_machine(worst).estimate.total > this_machine(found).estimate.total
    assert "micro-batch 4 x 512 tokens" in format_plan(worst)


@pytest.mark.parametrize("model_type,fast_paths,packing,expected", [
    ("llama", "auto", False, "padding-free"),
    ("qwen3", "auto", False, "padding-free"),
    ("llama", "off", False, "padded"),  # plain transformers pads
    ("gemma3", "auto", False, "padded"),  # a family the fast paths do not know
    ("llama", "auto", True, "packed"),
])
def test_the_planned_layout_is_the_one_training_takes(model_type, fast_paths, packing, expected):
    from dataclasses import replace

    from tunesmith.plan import planned_layout

    cfg = validate({"train": {"fast_paths": fast_paths}, "data": {"packing": packing}})
    shape = replace(model_shape("llama-3.2-1b"), model_type=model_type)
    assert planned_layout(cfg, shape) == expected


def test_the_families_by_name_are_the_families_by_class():
    """accel/families.py names the families for what reads a config only: the same as its classes."""
    from tunesmith.accel.families import MODEL_TYPES, known

    by_module = {cls.__module__ for cls in known()["attention"]}
    assert by_module == {importlib.import_module(f"transformers.models.{t}.modeling_{t}").__name__
                         for t in MODEL_TYPES}
    assert model_shape("qwen2.5-7b").model_type == "qwen2" and model_shape("mistral-7b").model_type == "mistral"


def test_a_preference_config_is_planned_from_its_pairs(tiny_model_dir, tmp_path):
    """A DPO config's data is read as pairs, as its training reads it (it once failed as SFT data)."""
    from helpers import write_jsonl

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Repeat: alpha beta {i}", "chosen": f"alpha beta {i}", "rejected": f"gamma {i} delta omega"}
        for i in range(12)])
    config = tmp_path / "dpo.json"
    config.write_text(json.dumps({"model": {"name": str(tiny_model_dir), "dtype": "float32"},
                                  "data": {"train": str(pairs), "max_seq_len": 256},
                                  "train": {"objective": "dpo", "batch_size": 2, "grad_accum": 1}}))
    found = plan_for(str(config))
    assert found.drawn and found.setup.objective == "dpo"
    assert found.setup.batch == 4  # two pairs: chosen and rejected of each


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux's peak resident size")
def test_the_measured_peak_leaves_out_what_the_base_scoring_freed():
    """A run's measured peak starts after the base model's scoring: memory that scoring freed but
    glibc kept resident is handed back first, or the peak counts it as training's."""
    import torch

    from tunesmith.plan import TrainingMemory

    memory = TrainingMemory()
    scratch = [torch.ones(16384) for _ in range(2048)]  # 128 MiB of 64 KiB blocks, in glibc's heap
    last = scratch[-1]
    del scratch  # freed, all but the heap's top block: resident until trimmed
    memory.start()
    assert memory.peak() < 48 * 2**20
    del last


def test_the_epoch_time_counts_the_padding_that_padded_rows_compute(tiny_model_dir, tmp_path):
    """Padded rows (plain transformers: train.fast_paths=off, or a family the fast paths do not know)
    compute their padding: the planned epoch counts the tokens the run's own micro-batches compute."""
    from tunesmith.config import load_config
    from tunesmith.data.collate import PADDED, micro_batch
    from tunesmith.objectives import prepare_data
    from tunesmith.plan.run import first_steps

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=100, fast_paths="off")
    cfg = load_config(config)
    split = prepare_data(cfg, cfg.model.name).splits["train"]
    drawn = [[split.encoded[i] for i in batch] for step in first_steps(split, cfg, PADDED, 100) for batch in step]
    computed = sum(micro_batch(batch, PADDED, 0)["input_ids"].numel() for batch in drawn)
    trained = sum(len(e.input_ids) for batch in drawn for e in batch)
    assert computed > 1.02 * trained  # the questions differ in length: rows pad
    found = plan_for(str(config), device="t4", include_this_machine=False)
    assert found.padding == pytest.approx(computed / trained)
    assert found.tokens == round(sum(len(e.input_ids) for e in split.encoded) * found.padding)
    assert "of them padding the rows compute" in format_plan(found)
    free = plan_for(str(config), ["train.fast_paths=auto"], device="t4", include_this_machine=False)
    assert free.padding < found.padding and free.target.epoch_seconds < found.target.epoch_seconds


def test_the_plan_of_a_config_times_the_run_it_asks_for_not_only_an_epoch(tiny_model_dir, tmp_path):
    """`plan my.yaml` with train.max_steps 20 gave one epoch's time alone; the run is its steps' share of
    an epoch (or train.epochs of them)."""
    from tunesmith.config import load_config
    from tunesmith.objectives import prepare_data

    config = write_config(tmp_path, tiny_model_dir, "run", max_steps=3)  # batch 4 x accumulation 2
    cfg = load_config(config)
    examples = len(prepare_data(cfg, cfg.model.name).splits["train"])
    found = plan_for(str(config), device="t4", include_this_machine=False)
    assert found.run_epochs == pytest.approx(3 * 4 * 2 / examples)
    text = format_plan(found)
    assert f"the run: {found.run_epochs:.3g} epochs of its data" in text and "  epoch  run" in text
    settings = json.loads(config.read_text())
    settings["train"].pop("max_steps")
    settings["train"]["epochs"] = 2.5
    config.write_text(json.dumps(settings))
    assert plan_for(str(config), device="t4", include_this_machine=False).run_epochs == pytest.approx(2.5, rel=0.05)
    assert plan_for(model="llama-3.1-8b", seq=512, batch=8).run_epochs is None  # no config: no run to time


def test_the_mfu_of_several_ranks_is_each_devices_share_over_its_own_peak(monkeypatch):
    """The progress records' tokens/s count every rank's tokens: over one device's peak, the MFU of N
    GPUs read N times too high."""
    import tunesmith.plan as plan_module
    from tunesmith.api import _utilisation

    monkeypatch.setattr(plan_module, "utilisation_of", lambda cfg, split, device: lambda speed: speed / 1000)
    assert _utilisation(None, None, None)(500) == 0.5
    assert _utilisation(None, None, None, world=2)(500) == 0.25
