"""The real training path on a tiny model: the loss falls, the adapter reloads with the same logits."""
import copy
import json
import math

import pytest
import torch

import tunesmith
from tunesmith.config import Config
from tunesmith.data.collate import collate
from tunesmith.data.tokenize import encode
from tunesmith.models import load_model
from tunesmith.training.step import total_steps
from tunesmith.training.loss import label_loss_sum


def test_label_loss_matches_transformers_loss(tiny_model_dir, tiny_tokenizer):
    from tunesmith.data.demo import make_splits

    rows = make_splits(6, seed=3, validation_size=0, test_size=0)["train"]
    batch = collate([encode(tiny_tokenizer, r["messages"]) for r in rows], tiny_tokenizer.pad_token_id)
    model = load_model(str(tiny_model_dir))
    total, count = label_loss_sum(model, batch)
    reference = model(**batch).loss  # mean over label tokens, shifted inside transformers
    assert count == int((batch["labels"][:, 1:] != -100).sum())
    assert torch.allclose(total / count, reference, atol=1e-5)


def test_train_end_to_end_on_tiny_model(tiny_config):
    # On the CPU: the memory checks below are of resident memory, the CPU's (a run on a GPU measures CUDA
    # memory, and its records carry no resident peak).
    tiny_config["train"]["device"] = "cpu"
    results = tunesmith.train(tiny_config)
    run = results["run_dir"]
    assert results["final_loss"] < results["first_loss"] * 0.97
    assert results["fine_tuned"]["eval_loss"] < results["base"]["eval_loss"]
    assert results["trainable_parameters"] < results["total_parameters"]
    # adapter.gradient_checkpointing: auto (the default): the tiny model fits, nothing recomputes
    assert results["gradient_checkpointing"] == {"blocks": 0, "of": 2, "setting": "auto"}
    for name in ("config.yaml", "metrics.jsonl", "results.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/tokenizer.json", "data/train.jsonl"):
        assert (tunesmith_path := __import__("pathlib").Path(run) / name).exists(), tunesmith_path
    records = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    train_records = [r for r in records if r.get("event") == "train"]
    assert [r["step"] for r in train_records] == [4, 8, 12]
    assert all(r["tokens_per_second"] > 0 for r in train_records)
    assert {"json_valid", "all_fields", "field/product"} <= set(results["fine_tuned"])
    # Training memory against the plan: the interpreter and libraries (most of this process) left out.
    from tunesmith.plan.devices import resident

    assert results["peak_memory"]["predicted"] > 0
    assert 0 < results["peak_memory"]["measured"] < resident("VmRSS") / 2
    # Each record carries the process's peak so far: it never falls, and the run's training peak is within it.
    peaks = [r["resident_peak_gib"] * 2**30 for r in train_records]
    assert peaks == sorted(peaks) and peaks[-1] >= results["peak_memory"]["measured"]


def test_saved_adapter_reloads_with_same_logits(tiny_config, tiny_model_dir):
    from peft import PeftModel

    from tunesmith.runs import load_trained

    tiny_config["eval"]["generate"] = False
    results = tunesmith.train(tiny_config)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    # On the CPU beside plain peft (the run itself trained on the GPU where there is one): one device, exact.
    ours, _, _ = load_trained(results["run_dir"], dtype=torch.float32, device="cpu")
    plain = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), f"{results['run_dir']}/adapter")
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, plain(input_ids=ids).logits
        base = load_model(str(tiny_model_dir))(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(a, base, atol=1e-3), "the adapter changed nothing"


def test_token_normalised_accumulation_gives_same_gradients(tiny_model_dir, tiny_tokenizer):
    """Batch 8 x accumulation 1 equals batch 1 x accumulation 8 on examples of mixed lengths."""
    from helpers import trainable
    from tunesmith.config import AdapterConfig
    from tunesmith.data.demo import make_splits

    rows = make_splits(8, seed=5, validation_size=0, test_size=0)["train"]
    examples = [encode(tiny_tokenizer, r["messages"]) for r in rows]
    assert len({len(e.input_ids) for e in examples}) > 1
    pad = tiny_tokenizer.pad_token_id

    def grads(groups):
        torch.manual_seed(0)
        model = trainable(load_model(str(tiny_model_dir)), AdapterConfig(r=4))
        batches = [collate(g, pad) for g in groups]
        labels = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        for batch in batches:
            (label_loss_sum(model, batch)[0] / labels).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])

    whole = grads([examples])
    pieces = grads([[e] for e in examples])
    assert (whole - pieces).norm() / whole.norm() < 1e-5


def test_full_fine_tune_saves_a_model_folder(tiny_config):
    tiny_config["adapter"] = {"method": "full"}
    tiny_config["train"]["lr"] = 1e-3
    tiny_config["eval"]["generate"] = False
    results = tunesmith.train(tiny_config)
    assert results["trainable_parameters"] == results["total_parameters"]
    assert (__import__("pathlib").Path(results["run_dir"]) / "model" / "model.safetensors").exists()
    assert results["final_loss"] < results["first_loss"]


@pytest.mark.parametrize("bad, message", [
    ("train:\n  lr_rate: 1\n", "did you mean 'train.lr'"),
    ("data:\n  train: /nonexistent/data.jsonl\n", "data file not found"),
])
def test_user_errors_exit_2_with_one_line(tmp_path, bad, message):
    import subprocess
    import sys

    path = tmp_path / "bad.yaml"
    path.write_text(bad + "model: /nonexistent-model-folder-for-test\n" if "lr_rate" in bad else bad)
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(path), f"output.dir={tmp_path}/run"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_steps_are_random_draws_cut_into_little_padding():
    """Which examples share a step depends only on the seed and batch_size * grad_accum (so the
    gradient does not depend on the micro-batch split); every epoch covers every example once;
    micro-batches hold at most batch_size examples and pad less than the shuffled order would."""
    import itertools
    import random

    from tunesmith.data.collate import step_batches

    lengths = [random.Random(i).randint(10, 500) for i in range(96)]
    streams = {(b, a): step_batches(lengths, b, a, seed=5) for b, a in ((4, 2), (8, 1), (1, 8), (3, 4))}
    for _ in range(24):  # two epochs of 12 steps
        steps = {key: next(stream) for key, stream in streams.items() if key != (3, 4)}
        members = {key: sorted(itertools.chain(*step)) for key, step in steps.items()}
        assert members[(4, 2)] == members[(8, 1)] == members[(1, 8)]
        assert all(len(batch) <= 4 for batch in steps[(4, 2)])
        assert all(len(batch) == 1 for batch in steps[(1, 8)])
    epoch = [i for _ in range(8) for batch in next(streams[(3, 4)]) for i in batch]  # 96 examples, 12 per step
    assert sorted(epoch) == list(range(96))
    # train.epochs counts passes over the data: steps draw whole batch_size x grad_accum, the remainder of
    # an epoch opening the next step (12 examples at 8 a step: 3 epochs are 5 steps, 40 draws, not 6 and 48)
    config = Config.model_validate({"data": {"train": "x.jsonl"}, "train": {"epochs": 3, "batch_size": 8}})
    assert total_steps(config, 12) == 5
    for n, batch, accum, epochs in ((12, 8, 1, 3), (9, 4, 1, 3), (50, 16, 1, 3), (17, 8, 2, 2), (100, 4, 2, 0.5)):
        config = Config.model_validate({"data": {"train": "x.jsonl"},
                                        "train": {"epochs": epochs, "batch_size": batch, "grad_accum": accum}})
        drawn = total_steps(config, n) * batch * accum
        assert epochs * n <= drawn < epochs * n + batch * accum

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    stream = step_batches(lengths, 4, 2, seed=1)
    cut = [batch for _ in range(12) for batch in next(stream)]
    order = list(range(96))
    random.Random(1 * 100_003).shuffle(order)
    plain = [order[i:i + 4] for i in range(0, 96, 4)]
    assert padded(cut) < 0.9 * padded(plain)


def test_each_train_record_gives_its_logging_intervals_mean_loss(tiny_config, tmp_path, monkeypatch):
    """A record every 4 steps carries the mean of those 4 steps' losses (the progress line shows it,
    the report and dashboard draw it) beside its own step's: the same run logged every step says
    what each step's loss was, and the learning rate each step trained with."""
    applied, step = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: applied.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    tiny_config["train"]["warmup_ratio"] = 0.25
    logged = {}
    for every in (1, 4):
        config = copy.deepcopy(tiny_config)
        config["train"]["log_every"] = every
        config["eval"]["generate"] = False
        config["output"]["dir"] = str(tmp_path / f"every-{every}")
        run = tunesmith.train(config)["run_dir"]
        logged[every] = [r for r in map(json.loads, open(f"{run}/metrics.jsonl")) if r.get("event") == "train"]
    step_loss = {r["step"]: r["loss"] for r in logged[1]}
    assert len(step_loss) == 12 and not any("mean_loss" in r for r in logged[1])
    assert [r["lr"] for r in logged[1]] == applied[:12] and applied[:12] == applied[12:]
    assert applied[3] == tiny_config["train"]["lr"] > applied[2] > applied[0]  # warmed up over 3 steps, then the peak
    assert [r["step"] for r in logged[4]] == [4, 8, 12]
    for record in logged[4]:
        interval = [step_loss[s] for s in range(record["step"] - 3, record["step"] + 1)]
        assert record["loss"] == step_loss[record["step"]]
        assert record["mean_loss"] == pytest.approx(sum(interval) / 4, rel=1e-6)


def test_cosine_schedule_decays_to_the_floor_not_to_zero():
    """warmup_cosine(total 10, warm-up 0, floor 0.1): factor 0.1 + 0.9 * (1 + cos(pi * step / 10)) / 2,
    so 1.0 at step 0, 0.55 halfway, the floor 0.1 from step 10 on (not 0: train.min_lr_ratio); with
    4 warm-up steps, (step + 1) / 5 before the decay starts at step 4."""
    from tunesmith.training.schedule import warmup_cosine

    def rates(warmup: int, steps: int) -> list[float]:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = warmup_cosine(optimizer, 10, warmup, 0.1)
        seen = []
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain = rates(0, 13)
    assert plain[0] == pytest.approx(1.0) and plain[5] == pytest.approx(0.55)
    assert plain[10] == pytest.approx(0.1) and plain[12] == pytest.approx(0.1)
    assert plain[2] == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2)
    warm = rates(4, 8)
    assert warm[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0]) and warm[7] == pytest.approx(0.55)


def test_gradients_are_clipped_to_the_max_norm_and_the_norm_before_is_returned():
    """train.max_grad_norm: gradients of total norm 20 (four entries of 10 over two tensors) are scaled
    to norm 1 (each entry 0.5); the step's logged grad_norm is the norm before clipping."""
    from tunesmith.training.loop import _clip

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    norm = _clip(params, 1.0)
    assert float(norm) == pytest.approx(20.0)
    after = torch.cat([p.grad for p in params])
    assert float(after.norm()) == pytest.approx(1.0, rel=1e-5)
    assert torch.allclose(after, torch.full((4,), 0.5), rtol=1e-5)
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    assert float(_clip(params, None)) == pytest.approx(20.0)  # no max_grad_norm: measured, left as they are
    assert torch.equal(torch.cat([p.grad for p in params]), torch.full((4,), 10.0))


def test_a_step_retried_after_running_out_of_memory_starts_from_zero_gradients():
    """train.auto_micro_batch: an attempt that ran backward on some micro-batches before running out of
    memory left gradients behind; the retry with halved micro-batches must not add to them, so the
    step's gradients are one clean pass's (d/dw sum(w * x) = x), not twice that."""
    from tunesmith.config import validate
    from tunesmith.training import distributed
    from tunesmith.training.loop import _step_with_retries

    weight = torch.nn.Parameter(torch.zeros(3))
    x = torch.tensor([1.0, 2.0, 3.0])
    tried = []

    class Objective:
        def train_step(self, loss_module, train, indices, pad_id, ranks, grad_scale, layout, pieces, step):
            tried.append(pieces)
            (weight * x).sum().backward()
            if len(tried) == 1:  # the first attempt's backward ran, then a later micro-batch did not fit
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return torch.tensor(1.0), 8

    cfg = validate({"train": {"auto_micro_batch": True}})
    optimizer = torch.optim.SGD([weight], lr=0.1)
    loss, tokens, pieces = _step_with_retries(None, None, [[0, 1, 2, 3]], 1, 0, distributed.SINGLE, 1.0, "padded",
                                              cfg, 0, optimizer, objective=Objective())
    assert tried == [1, 2] and pieces == 2 and tokens == 8
    assert torch.equal(weight.grad, x)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_end_of_a_sharded_run_writes_the_weights_without_the_base(method, tiny_model_dir, tiny_tokenizer, tmp_path,
                                                                      monkeypatch):
    """After FSDP2, rank 0 writes the gathered weights through a skeleton of the model (no base weights):
    the same files as saving the whole trained model (the base's own generation_config.json too), the
    whole model back only where it fits, and the weights kept where no model folder can be written."""
    import shutil

    from safetensors.torch import load_file

    from tunesmith import methods
    from tunesmith.config import Config
    from tunesmith.errors import UserError
    from tunesmith.methods.common import save_trained
    from tunesmith.training import sharded_end

    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, "eos_token_id": [2, 5], "top_k": 20}))
    cfg = Config.model_validate({"model": {"name": str(base), "dtype": "float32"}, "data": {"train": "demo"},
                                 "adapter": {"method": method, "r": 4}})
    kind = methods.get(method)
    model = kind.make_trainable(kind.load_base(str(base), torch.float32, torch.device("cpu")), cfg.adapter)
    torch.manual_seed(0)
    with torch.no_grad():  # trained weights unlike the base's, LoRA's B no longer zero
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.01) if param.requires_grad else None
    gathered = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad or method == "full"}
    save_trained(model, tiny_tokenizer, tmp_path / "whole")
    cpu = torch.device("cpu")
    none, why = sharded_end.finish(gathered, cfg, kind, torch.float32, cpu, tiny_tokenizer, tmp_path / "none", free=1)
    assert none is None and why.endswith("GiB free on cpu")
    back, why = sharded_end.finish(gathered, cfg, kind, torch.float32, cpu, tiny_tokenizer, tmp_path / "back",
                                   free=2**40)
    files = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert ("generation_config.json" in files) == (method == "full")
    for folder in ("none", "back"):
        assert files == sorted(p.name for p in (tmp_path / folder).iterdir())
        assert all((tmp_path / "whole" / f).read_bytes() == (tmp_path / folder / f).read_bytes() for f in files), folder
    assert why is None and all(torch.equal(p, gathered[n]) for n, p in back.named_parameters() if n in gathered)

    def fails(*args):
        raise RuntimeError("a persistent buffer left on the meta device")

    monkeypatch.setattr(sharded_end, "save_trained", fails)
    with pytest.raises(UserError, match="could not be written as a model folder .*they are kept"):
        sharded_end.finish(gathered, cfg, kind, torch.float32, cpu, tiny_tokenizer, tmp_path / "kept")
    kept = load_file(tmp_path / "kept" / sharded_end.KEPT)
    assert kept.keys() == gathered.keys() and all(torch.equal(kept[n], gathered[n]) for n in kept)


def test_a_max_seq_len_past_the_models_positions_is_warned_of(tiny_config, capsys):
    """The tiny model has 512 positions; 600 went by without a word (rotary positions run on untrained there)."""
    tiny_config["data"].update(max_seq_len=600, demo_size=16)
    tiny_config["train"]["max_steps"] = 1
    tiny_config["eval"].update(generate=False, general=False, report=False)
    tunesmith.train(tiny_config)
    assert "warning: data.max_seq_len=600 is more than the 512 positions" in capsys.readouterr().err
