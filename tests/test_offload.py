"""adapter.offload_activations (training/offload.py): under gradient checkpointing the blocks'
inputs wait in host memory between forward and backward. The hooks act on CUDA tensors only; here
they are pointed at the CPU's to check what they move and that the gradients stay the same (the
CUDA run itself: bench/gpu_check.sh)."""
from __future__ import annotations

import pytest
import torch

from helpers import demo_examples, loss_and_grads, relative_difference, trainable
from tunesmith.config import AdapterConfig, validate
from tunesmith.errors import UserError
from tunesmith.models import load_model
from tunesmith.plan import Setup, estimate, model_shape
from tunesmith.training.offload import HostActivations, offloaded


def _batch(model, tokenizer, n: int) -> dict:
    """n demo examples in the run's layout (padding-free where the fast paths' attention is on)."""
    from tunesmith import accel
    from tunesmith.data.collate import PADDED, PADDING_FREE, micro_batch

    return micro_batch(demo_examples(tokenizer, n), PADDING_FREE if accel.padding_free(model) else PADDED,
                       tokenizer.pad_token_id)


def _checkpointed_lora(folder):
    torch.manual_seed(0)
    model = trainable(load_model(str(folder), torch.float32), AdapterConfig(method="lora", gradient_checkpointing=True))
    model.train()
    return model


def test_the_blocks_inputs_go_to_the_host_and_the_gradients_stay_the_same(tiny_model_dir, tiny_tokenizer):
    model = _checkpointed_lora(tiny_model_dir)
    batch = _batch(model, tiny_tokenizer, 4)
    expected_loss, expected = loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)

    moved: list[tuple[int, ...]] = []
    hooks = HostActivations(devices=("cpu",), min_bytes=1)
    pack = hooks.pack_hook

    def counted(tensor):
        packed = pack(tensor)
        if packed is not tensor:
            moved.append(tuple(tensor.shape))
        return packed

    hooks.pack_hook = counted
    with hooks:
        loss, grads = loss_and_grads(model, batch)
    assert loss == expected_loss and relative_difference(expected, grads) == 0.0
    tokens, hidden, layers = batch["input_ids"].numel(), model.config.hidden_size, model.config.num_hidden_layers
    block_inputs = [shape for shape in moved if shape[-1] == hidden and len(shape) == 3 and shape[0] * shape[1] == tokens]
    # each block's input, and the final norm's: nothing from inside a checkpointed block
    assert len(block_inputs) == layers + 1
    assert hooks.offloaded_bytes < (layers + 3) * tokens * hidden * 4


def test_offloading_leaves_cpu_tensors_and_evaluation_alone(tiny_model_dir, tiny_tokenizer):
    model = _checkpointed_lora(tiny_model_dir)
    batch = _batch(model, tiny_tokenizer, 2)
    hooks = HostActivations()  # CUDA tensors only
    with hooks:
        loss_and_grads(model, batch)
    assert hooks.offloaded_bytes == 0
    calls = []
    loss_fn = offloaded(lambda m, b: calls.append(torch.is_grad_enabled()) or 0, enabled=True)
    with torch.no_grad():
        loss_fn(model, batch)
    assert calls == [False]
    assert offloaded(len, enabled=False) is len


def test_offloading_needs_checkpointing_and_the_plan_counts_one_block_input():
    with pytest.raises(UserError, match="gradient_checkpointing"):
        validate({"adapter": {"offload_activations": True}})
    shape = model_shape("llama-3.1-8b")
    setup = dict(method="qlora", dtype="bfloat16", batch=2, seq=2048, gradient_checkpointing=True, r=32)
    kept, offload = (estimate(shape, Setup(**setup, offload_activations=flag)) for flag in (False, True))
    block_input = 2 * 2048 * shape.hidden * 2
    # at most one block's input on the device: 31 or 32 of them fewer, by the moment of the peak
    saved = kept.parts["activations"] - offload.parts["activations"]
    assert (shape.layers - 1) * block_input <= saved <= shape.layers * block_input


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it on one)")
def test_on_cuda_the_inputs_cross_without_synchronising_and_the_gradients_stay(tiny_model_dir, tiny_tokenizer):
    from helpers import gradients
    from test_step_sync import synchronisations
    from tunesmith.device import to_device
    from tunesmith.training.loss import label_loss_sum

    device = torch.device("cuda", 0)
    torch.manual_seed(0)
    model = trainable(load_model(str(tiny_model_dir), torch.float32, device=device),
                      AdapterConfig(method="lora", gradient_checkpointing=True))
    model.train()
    batch = to_device(_batch(model, tiny_tokenizer, 4), device)
    expected_loss, expected = loss_and_grads(model, batch)  # also compiles the fast paths
    model.zero_grad(set_to_none=True)
    with HostActivations(min_bytes=1):  # and anything compiled anew with the hooks on
        loss_and_grads(model, batch)
    model.zero_grad(set_to_none=True)
    hooks = HostActivations(min_bytes=1)
    torch.cuda.synchronize()
    with synchronisations() as found, hooks:
        total, count = label_loss_sum(model, batch)
        (total / count).backward()
    assert found == [], "host synchronisations:\n" + "\n".join(found)
    assert hooks.offloaded_bytes > 0
    assert float(total) / count == pytest.approx(expected_loss, rel=1e-6)
    assert relative_difference(expected, gradients(model)) < 1e-6
