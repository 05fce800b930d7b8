"""The plan's memory per device under FSDP2 (plan/sharding.py) against FSDP2 itself.

In one process: torch's fake process group (its own tool for memory planning: collectives do
nothing) makes this process rank 0 of two, so training/distributed.py shards the real tiny model
exactly as on two devices, and one training step fills the shards' gradients and AdamW states.
"""
import pytest
import torch

from tunesmith import methods
from tunesmith.config import AdapterConfig
from tunesmith.data.prepare import Split
from tunesmith.data.tokenize import IGNORE, Encoded
from tunesmith.models import load_model
from tunesmith.plan import Setup, estimate, model_shape
from tunesmith.plan.sharding import IN_FLIGHT, per_device
from tunesmith.training import distributed
from tunesmith.training.step import train_step
from tunesmith.training.loss import label_loss_sum

WORLD = 2


@pytest.fixture
def two_fake_ranks():
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    yield distributed.Ranks(0, WORLD, 0, device=torch.device("cpu"))
    dist.destroy_process_group()


def local_bytes(tensors) -> int:
    """Bytes this rank holds of `tensors` (a DTensor's local shard)."""
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp_shards_and_gathered_weights_match_the_plan(method, tiny_model_dir, two_fake_ranks):
    torch.manual_seed(0)
    model = methods.get(method).make_trainable(load_model(str(tiny_model_dir)), AdapterConfig(method=method, r=4))
    whole = sum(p.nbytes for p in model.parameters())
    loss_module, scale = distributed.wrap(model, label_loss_sum, two_fake_ranks, fsdp=True)
    trained = [p for p in model.parameters() if p.requires_grad]  # FSDP2's sharded parameters now
    frozen = [p for p in model.parameters() if not p.requires_grad]
    # While a block's MLP runs (the block gathered by then): the bytes of every weight gathered whole.
    gathered = []

    def count(module, args):
        gathered.append(sum(p.nbytes for p in model.parameters() if not hasattr(p, "to_local")))

    for block in (model.get_base_model() if method != "full" else model).model.layers:
        block.mlp.register_forward_pre_hook(count)
    rows = [Encoded(list(range(5, 45)), [IGNORE] * 20 + list(range(25, 45))) for _ in range(4)]
    train_step(loss_module, Split("train", [], rows), [[0, 1, 2, 3]], 0, two_fake_ranks, scale)
    optimizer = torch.optim.AdamW(trained, lr=1e-3)
    optimizer.step()

    shape = model_shape(str(tiny_model_dir))
    setup = Setup(method=method, dtype="float32", batch=2, seq=40, r=4, devices=WORLD, fsdp=True)
    planned = per_device(estimate(shape, setup), gpu=False)
    one_device = estimate(shape, setup)
    stored = local_bytes(frozen) + local_bytes(trained)
    assert stored == pytest.approx(whole / WORLD, rel=0.02)  # the model really is sharded in two
    assert planned.parts["weights"] + planned.parts["adapter weights"] == pytest.approx(stored, rel=0.02)
    states = local_bytes(v for s in optimizer.state.values() for v in s.values() if v.dim() > 0)
    assert planned.parts["optimizer states"] == pytest.approx(states, rel=0.02)
    assert one_device.parts["optimizer states"] == pytest.approx(WORLD * states, rel=0.02)
    # the root (embeddings, final norm, head) stays gathered through the forward; blocks come and go
    assert max(gathered) <= planned.parts["gathered weights (FSDP)"]
    block = (whole - shape.embedding_params * 4 - shape.hidden * 4) / shape.layers
    root = shape.embedding_params * 4 + shape.hidden * 4
    assert max(gathered) >= root + block  # a block and the root at once: one block fewer than the plan allows
    assert planned.parts["gathered weights (FSDP)"] == pytest.approx(root + IN_FLIGHT * block, rel=0.01)


def test_ddp_replicas_and_one_device_are_planned_whole():
    shape = model_shape("llama-3.1-8b")
    one = estimate(shape, Setup(method="lora", seq=2048, batch=2))
    for setup in (Setup(method="lora", seq=2048, batch=2, devices=8),  # DDP: replicas
                  Setup(method="lora", seq=2048, batch=2, devices=1, fsdp=True)):
        assert per_device(estimate(shape, setup), gpu=True).total == pytest.approx(one.total)


def test_70b_lora_fits_eight_80gb_gpus_only_sharded():
    """The issue's example: a 70B LoRA run does not fit one 80 GB GPU, nor 8 replicas, but does
    sharded over 8; the time per epoch is shared by the devices."""
    from tunesmith.plan import plan

    def on_h100(**spread):
        setup = Setup(method="lora", seq=2048, batch=1, gradient_checkpointing=True, **spread)
        return plan("llama-3.1-70b", setup, device="h100", tokens=10**7, include_this_machine=False).target

    one, replicas, sharded = on_h100(), on_h100(devices=8), on_h100(devices=8, fsdp=True)
    assert not one.fits and not replicas.fits and sharded.fits
    assert sharded.device.name == "8 x H100 80 GB"
    weights = sharded.estimate.parts
    assert weights["weights"] == pytest.approx(one.estimate.parts["weights"] / 8)
    # gathered: the embeddings and the untied head (bf16), and two blocks of 0.86B weights in bf16
    assert weights["gathered weights (FSDP)"] / 2**30 == pytest.approx((2 * 128256 * 8192 + 2 * 855.6e6) * 2 / 2**30,
                                                                       rel=0.01)
    assert sharded.epoch_seconds == pytest.approx(one.epoch_seconds / 8)


def test_plan_refuses_fsdp_with_qlora_as_a_config_does(capsys):
    from tunesmith.cli import main

    assert main(["plan", "--model", "llama-3.1-8b", "--method", "qlora", "--fsdp", "--nproc", "2",
                 "--no-this-machine"]) == 2
    assert "error: train.fsdp does not work with adapter.method: qlora yet" in capsys.readouterr().err
    assert main(["plan", "--model", "llama-3.1-8b", "--method", "lora", "--fsdp", "--nproc", "2",
                 "--no-this-machine"]) == 0
