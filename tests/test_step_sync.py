"""A training step leaves the device alone until its end (issue 19): no host synchronisation inside
its micro-batches (label counts come from the data, the losses are summed on the device), and
one read per optimizer step, of the loss and the gradient norm together. On CUDA,
torch.cuda.set_sync_debug_mode("warn") reports every synchronising call with its Python line;
those tests skip without CUDA (bench/gpu_check.sh runs them on a GPU)."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from helpers import build_model, demo_examples, lora_model, trainable, write_jsonl
from tunesmith import accel, methods
from tunesmith.config import AdapterConfig
from tunesmith.data.collate import PADDED, PADDING_FREE
from tunesmith.data.prepare import Split
from tunesmith.training.distributed import StepLoss
from tunesmith.device import host_floats
from tunesmith.training.loop import _clip
from tunesmith.training.loss import label_loss_sum
from tunesmith.training.step import train_step


def test_host_floats_reads_numbers_and_device_scalars_in_their_order():
    assert host_floats(torch.tensor(1.5), 2, torch.tensor([3.0], dtype=torch.bfloat16), 0.25) == [1.5, 2.0, 3.0, 0.25]
    assert host_floats(4) == [4.0]


def test_a_rows_bounds_are_read_from_its_host_copy_not_from_the_device(tiny_tokenizer):
    """The attention's per-sequence path (fp32 rows on CUDA, attention dropout) needs the row's bounds as
    host ints, once per layer: read from the device, each was a host synchronisation. They are kept
    from the copy to the device; a meta tensor, which cannot be read, stands for the device here."""
    from tunesmith.accel.rows import bounds_list
    from tunesmith.data.collate import flat_batch
    from tunesmith.device import to_device

    batch = flat_batch(demo_examples(tiny_tokenizer, 3))
    moved = to_device(batch, torch.device("meta"))
    assert moved["cu_seq_lens"].device.type == "meta"
    assert bounds_list(moved["cu_seq_lens"]) == batch["cu_seq_lens"].tolist()
    with pytest.raises(Exception):  # a tensor not copied by to_device is read from where it is
        bounds_list(torch.empty(3, device="meta"))


def _step_parts(folder, tokenizer, method: str, device: torch.device):
    model = trainable(methods.get(method).load_base(str(folder), torch.bfloat16, device),
                      AdapterConfig(method=method, r=4, alpha=8, gradient_checkpointing=True))
    layout = PADDING_FREE if accel.padding_free(model) else PADDED
    split = Split("train", [], demo_examples(tokenizer, 8))
    return model, StepLoss(model, label_loss_sum), split, layout


def test_a_step_returns_its_loss_on_the_device_without_reading_it(tmp_path, tiny_tokenizer):
    """train_step hands back a device scalar; fit reads it with the gradient norm."""
    build_model(tmp_path, "llama", vocab=len(tiny_tokenizer), seed=3)
    model, loss_module, split, layout = _step_parts(tmp_path, tiny_tokenizer, "lora", torch.device("cpu"))
    loss, tokens = train_step(loss_module, split, [[0, 1], [2, 3, 4]], tiny_tokenizer.pad_token_id, layout=layout)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.dtype == torch.float32
    assert tokens == sum(len(split.encoded[i].input_ids) for i in range(5))
    value, norm = host_floats(loss, _clip([p for p in model.parameters() if p.requires_grad], 1.0))
    assert 0 < value < 20 and norm > 0


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it on one)")


@contextlib.contextmanager
def synchronisations():
    """Every CUDA host synchronisation inside the block, as 'file:line: message' (filled at its end)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode("default")
    found += [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if "synchroniz" in str(w.message)]


@needs_cuda
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_on_cuda_a_step_synchronises_only_for_its_one_read(tmp_path, tiny_tokenizer, method):
    build_model(tmp_path, "llama", vocab=len(tiny_tokenizer), seed=3)
    model, loss_module, split, layout = _step_parts(tmp_path, tiny_tokenizer, method, torch.device("cuda", 0))
    params = [p for p in model.parameters() if p.requires_grad]
    micro_batches = [[0, 1, 2], [3, 4], [5, 6, 7]]
    train_step(loss_module, split, micro_batches, tiny_tokenizer.pad_token_id, layout=layout)  # compiles, warms up
    host_floats(_clip(params, 1.0))
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with synchronisations() as inside:
        loss, _ = train_step(loss_module, split, micro_batches, tiny_tokenizer.pad_token_id, layout=layout)
        norm = _clip(params, 1.0)
    with synchronisations() as read:
        values = host_floats(loss, norm)
    assert inside == [], "host synchronisations inside the step:\n" + "\n".join(inside)
    assert len(read) == 1 and all(v == v for v in values)


def _dpo_parts(tmp_path, model_dir, tokenizer, device: torch.device):
    from test_objectives_training import pair_rows
    from tunesmith.config import validate
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_model
    from tunesmith.objectives.dpo import DPO
    from tunesmith.objectives.logps import Reference

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    cfg = validate({"data": {"train": str(path), "validation": str(path)},
                    "train": {"objective": "dpo", "beta": 0.5, "sft_weight": 0.5}})
    split = prepare_preference(cfg.data, tokenizer, PAIRS).splits["train"]
    model = lora_model(load_model(str(model_dir), device=device), seed=1)
    layout = PADDING_FREE if accel.padding_free(model) else PADDED
    objective = DPO(cfg, Reference(model), layout, tokenizer.pad_token_id)
    step = lambda: objective.train_step(StepLoss(model, objective.loss), split, [[0, 1], [2, 3]],  # noqa: E731
                                        tokenizer.pad_token_id, layout=layout)
    return model, objective, step


def test_an_objective_step_leaves_its_statistics_on_the_device_for_fits_one_read(tmp_path, tiny_model_dir,
                                                                                  tiny_tokenizer):
    model, objective, step = _dpo_parts(tmp_path, tiny_model_dir, tiny_tokenizer, torch.device("cpu"))
    loss, tokens = step()
    unread = objective.unread()
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and tokens > 0
    assert len(unread) >= 2 and all(isinstance(t, torch.Tensor) and t.ndim == 0 for t in unread)
    values = host_floats(loss, *unread)  # fit's read
    objective.settle(values[1:])
    assert objective.unread() == [] and "rewards/margin" in objective.last_metrics
    settled = objective.last_metrics
    model.zero_grad(set_to_none=True)
    step()  # the same step again, its statistics read by last_metrics itself
    assert objective.last_metrics == pytest.approx(settled, rel=1e-6)


@needs_cuda
def test_on_cuda_a_dpo_step_synchronises_once_for_its_loss_and_statistics(tmp_path, tiny_model_dir, tiny_tokenizer):
    """The objectives' steps too: the micro-batches' losses and statistics stay on the device until
    fit's one read at the step's end."""
    model, objective, step = _dpo_parts(tmp_path, tiny_model_dir, tiny_tokenizer, torch.device("cuda", 0))
    step()  # warms up
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    with synchronisations() as inside:
        loss, _ = step()
    with synchronisations() as read:  # as fit reads them: with the loss (and the gradient norm)
        values = host_floats(loss, *objective.unread())
    objective.settle(values[1:])
    assert inside == [], "host synchronisations inside the step:\n" + "\n".join(inside)
    assert len(read) == 1 and values[0] == values[0] and "rewards/margin" in objective.last_metrics


def test_a_statistic_of_some_examples_needs_no_size_from_the_device():
    """KTO's rewards of its desirable and undesirable answers: a boolean index learns its size from the
    device (on CUDA a host synchronisation per micro-batch); the masked sums do not. A meta tensor,
    which has no values to learn a size from, stands for the device."""
    from tunesmith.objectives.base import masked_stat, stat

    values, mask = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([True, False, True])
    assert masked_stat(values, mask).tolist() == stat(values[mask]).tolist() == [5.0, 2.0]
    assert masked_stat(values, torch.zeros(3, dtype=torch.bool)).tolist() == [0.0, 0.0]
    assert masked_stat(values.to("meta"), mask.to("meta")).shape == (2,)
    with pytest.raises(Exception):
        stat(values.to("meta")[mask.to("meta")])
