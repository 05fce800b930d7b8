"""What would fail or wait on CUDA and NCCL, checked on the CPU: the process group a CUDA run asks for,
and which collectives carry host numbers (on the host, through gloo) or device tensors (on the
device, through NCCL). A meta tensor, which cannot be read, stands for the device."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.distributed as dist

from tunesmith.training import distributed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_check.sh runs it on one)")
# One process on the device (a single GPU runs no NCCL group of two): the group a run of that device has.
ON = [pytest.param("cpu", id="cpu-gloo"), pytest.param("cuda", id="cuda-nccl-gloo", marks=needs_cuda)]


def test_on_cuda_the_process_group_has_gloo_beside_nccl_for_host_tensors(monkeypatch):
    """FSDP2's offloaded shards (train.fsdp_offload) keep their gradients in host memory, and their norm
    all-reduces CPU tensors: NCCL alone ends the first step ('No backend type associated with device type
    cpu'). Each rank computes on cuda:LOCAL_RANK."""
    asked, devices = {}, []

    def record(backend, **options):
        asked.update(options, backend=backend)
        raise RuntimeError("recorded")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", record)
    with pytest.raises(RuntimeError, match="recorded"):
        distributed.setup("auto")
    pairs = dict(pair.split(":") for pair in asked["backend"].split(","))
    assert pairs == {"cuda": "nccl", "cpu": "gloo"}
    assert asked["timeout"].total_seconds() >= 3600 and devices == [torch.device("cuda", 1)]


@pytest.fixture
def collectives(monkeypatch):
    """Every collective's tensors' devices (all_reduce) or device (object broadcast), recorded, not run."""
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, **_: seen.append(("all_reduce", tensor.device.type)))

    def broadcast(box, src=0, device=None, **_):
        seen.append(("broadcast_object_list", torch.device(device or "cpu").type))

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    return seen


def test_host_numbers_are_summed_on_the_host_and_device_tensors_on_the_device(collectives):
    """Under NCCL, Ranks.sum put its host numbers on the GPU and read them back: two waits for the
    device's whole queue, in every step of every run on several GPUs (the stop signal's `any`), and two
    more in each preference or reward objective's step (its counts, its host statistics)."""
    ranks = distributed.Ranks(0, 2, 0, device=torch.device("meta"))
    assert ranks.sum(1.0, 2.0) == [1.0, 2.0]  # not reduced here: the collective is only recorded
    assert ranks.most(3.0) == 3.0
    assert ranks.any(True) is True
    assert ranks.broadcast("newest") == "newest"
    assert ranks.sum_tensor(torch.ones(2, device="meta")).device.type == "meta"
    assert collectives == [("all_reduce", "cpu"), ("all_reduce", "cpu"), ("all_reduce", "cpu"),
                           ("broadcast_object_list", "cpu"), ("all_reduce", "meta")]


def test_an_objective_steps_counts_and_host_statistics_never_go_to_the_device(collectives, monkeypatch, tmp_path,
                                                                               tiny_model_dir, tiny_tokenizer):
    """A DPO step as rank 0 of two (the other rank's numbers recorded, not received): its counts and
    host statistics are summed on the host; the one collective on the device is the step's sum of its
    losses and statistics, read by fit with the gradient norm."""
    from test_objectives_training import pair_rows

    from helpers import lora_model, write_jsonl
    from tunesmith.config import validate
    from tunesmith.data.collate import PADDED
    from tunesmith.data.preference import PAIRS, prepare_preference
    from tunesmith.models import load_model
    from tunesmith.objectives.dpo import DPO
    from tunesmith.objectives.logps import Reference

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    cfg = validate({"data": {"train": str(path)}, "train": {"objective": "dpo"}})
    split = prepare_preference(cfg.data, tiny_tokenizer, PAIRS).splits["train"]
    model = lora_model(load_model(str(tiny_model_dir)), seed=1, fast_paths=False)
    objective = DPO(cfg, Reference(model), PADDED, tiny_tokenizer.pad_token_id)
    on_device = []
    monkeypatch.setattr(distributed.Ranks, "sum_tensor", lambda self, tensor: on_device.append(tensor) or tensor)
    ranks = distributed.Ranks(0, 2, 0, device=torch.device("meta"))
    objective.train_step(distributed.StepLoss(model, objective.loss), split, [[0, 1], [2, 3]],
                         tiny_tokenizer.pad_token_id, ranks, layout=PADDED)
    assert len(on_device) == 1 and collectives and all(kind == "cpu" for _, kind in collectives)


class _Decoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 4)])


class _Model(torch.nn.Module):
    """What shard() reads of a causal LM: get_decoder().layers, and weights outside them (the root's)."""

    def __init__(self):
        super().__init__()
        self.decoder, self.head = _Decoder(), torch.nn.Linear(4, 1)

    def get_decoder(self):
        return self.decoder


def test_under_fsdp2s_mixed_precision_the_batchs_float_values_reach_the_loss_in_fp32(monkeypatch):
    """On CUDA FSDP2 gathers bf16 weights and, by default, casts every floating-point input of a sharded
    module to bf16: the root's input is the batch, so a reference log-probability of -300.3 reached the
    loss as -300 (bf16 keeps 8 bits), more than a DPO margin at the start. CUDA's policy runs on one gloo
    rank here."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    cuda = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    monkeypatch.setattr(distributed, "mixed_precision", lambda device: cuda)
    seen = {}

    def loss(model, batch):
        seen["reference"] = batch["reference"]
        hidden = model.decoder.layers[0](batch["inputs"])
        seen["hidden"] = hidden.dtype  # the weights' bf16 still makes the activations bf16
        return model.head(hidden).float().sum() + batch["reference"].sum()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = _Model()
        root = distributed.StepLoss(model, loss)
        distributed.shard(model, root, distributed.Ranks(0, 1, 0), torch.device("cpu"), offload=False)
        reference = torch.tensor([-300.3, -41.7])
        root({"inputs": torch.randn(2, 4), "reference": reference}).backward()
    finally:
        dist.destroy_process_group()
    assert seen["reference"].dtype == torch.float32 and torch.equal(seen["reference"], reference)
    assert seen["hidden"] == torch.bfloat16


@contextlib.contextmanager
def one_rank_group(device_type: str):
    """The process group setup() makes for a run on `device_type`, as its only rank; the rank's device."""
    dist.init_process_group(distributed.CUDA_BACKENDS if device_type == "cuda" else "gloo", store=dist.HashStore(),
                            rank=0, world_size=1)
    try:
        yield torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    finally:
        dist.destroy_process_group()


def _sum_of_head(model, batch):
    return model.head(model.decoder.layers[0](batch)).float().sum()


@pytest.mark.parametrize("device_type", ON)
def test_fsdp2_offloaded_shards_clip_their_gradients_in_the_group_a_run_has(device_type):
    """train.fsdp_offload: the gradients wait in host memory and their norm all-reduces CPU tensors
    (under NCCL alone: 'No backend type associated with device type cpu', pytorch/pytorch#148532)."""
    from tunesmith.device import host_floats
    from tunesmith.training.loop import _clip

    with one_rank_group(device_type) as device:
        torch.manual_seed(0)
        model = _Model().to(device)
        root = distributed.StepLoss(model, _sum_of_head)
        distributed.shard(model, root, distributed.Ranks(0, 1, 0, device=device), device, offload=True)
        root(torch.randn(3, 4, device=device)).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        assert all(p.grad.device.type == "cpu" for p in params)  # offloaded (on the CPU they were there already)
        (norm,) = host_floats(_clip(params, 1e-3))
    assert norm > 0 and math.isfinite(norm)


@pytest.mark.parametrize("device_type", ON)
def test_ddp_and_the_host_collectives_run_in_the_group_a_run_has(device_type):
    """DDP's gradients on the device, Ranks' host numbers, objects and barriers on the host, in one group."""
    from torch.nn.parallel import DistributedDataParallel

    with one_rank_group(device_type) as device:
        ranks = distributed.Ranks(0, 1, 0, device=device, host=torch.device("cpu"))
        ranks.world = 2  # takes the collectives' paths; the group itself has this one rank
        torch.manual_seed(0)
        model = _Model().to(device)
        module = DistributedDataParallel(distributed.StepLoss(model, _sum_of_head), gradient_as_bucket_view=True,
                                         device_ids=[device.index] if device.type == "cuda" else None)
        with distributed.no_sync(module, last=False):
            module(torch.randn(3, 4, device=device)).backward()
        with torch.no_grad():  # a forward without a backward (an evaluation, KTO's reference point)
            module(torch.randn(3, 4, device=device))
        module(torch.randn(3, 4, device=device)).backward()
        assert ranks.sum(1.5, 2) == [1.5, 2.0] and ranks.most(3.0) == 3.0 and ranks.any(True)
        assert ranks.broadcast({"step": 3}) == {"step": 3} and ranks.gather("rng")[0] == "rng"
        summed = ranks.sum_tensor(torch.ones(2, device=device))
        ranks.barrier()
        assert summed.device == device and summed.tolist() == [1.0, 1.0]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
