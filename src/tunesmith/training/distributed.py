"""Several processes, one per device, on torch.distributed: launched by torchrun.

Every rank builds the same global order of micro-batches and takes its own slice of each one, so
the examples of an optimizer step are the same as in one process. The loss is divided by the
label-token count of the whole step over all ranks (known on every rank from the data, no
communication needed), and the gradients are summed across ranks: the update equals one
process's with the same global batch, whatever the number of ranks.

Adapters and small models are replicated with DistributedDataParallel; `train.fsdp` shards a
full fine-tune's weights, gradients and optimizer state with FSDP2 (`fully_shard`).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def take(self, examples: list) -> list:
        """This rank's share of a micro-batch: every world-th example, starting at its rank."""
        return examples[self.rank::self.world] if self.active else examples

    def sum(self, *values: float) -> list[float]:
        """Sums over all ranks (the values themselves in one process)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (signals arrive per process)."""
        return bool(self.sum(float(flag))[0]) if self.active else flag

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Ranks()


def setup() -> Ranks:
    """The process group of a torchrun launch (gloo on CPU, nccl on CUDA); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def teardown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


class StepLoss(torch.nn.Module):
    """The summed label loss of a batch as a module's forward, so DDP and FSDP2 hooks see it."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def wrap(model, loss_fn, ranks: Ranks, fsdp: bool):
    """(module computing the loss, gradient scale): DDP averages gradients over ranks, so each rank's
    loss is scaled by the world size to make the average a sum; FSDP2 reduce-scatters likewise."""
    module = StepLoss(model, loss_fn)
    if not ranks.active:
        return module, 1.0
    if fsdp:
        if hasattr(model, "get_base_model"):
            from ..errors import UserError

            raise UserError("train.fsdp shards full fine-tuning (adapter.method=full); adapters train with DDP replicas")
        ranks.fsdp = True
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (ranks.world,))
        for layer in model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        # The wrapper is the root: embeddings, final norm and LM head are gathered around its forward.
        fully_shard(module, mesh=mesh)
        return module, float(ranks.world)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.local_rank] if torch.cuda.is_available() else None
    return DistributedDataParallel(module, device_ids=device_ids), float(ranks.world)


@contextlib.contextmanager
def no_sync(module, last: bool):
    """Skip the gradient reduction for all but the last micro-batch of a step (DDP and FSDP2)."""
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(last)
        yield
    elif last or not hasattr(module, "no_sync"):
        yield
    else:
        with module.no_sync():
            yield


def launch(nproc: int, argv: list[str]) -> int:
    """`tunesmith train --nproc N ...`: the same command under torchrun with N processes."""
    from torch.distributed.run import main as torchrun

    args = ["--standalone", f"--nproc_per_node={nproc}", "-m", "tunesmith.cli", *argv]
    try:
        torchrun(args)
    except SystemExit as done:
        return int(done.code or 0)
    except Exception as err:  # ChildFailedError: torchrun has already ended every rank
        print(f"error: distributed run failed: {str(err).strip().splitlines()[0] if str(err).strip() else err}",
              file=sys.stderr)
        return 1
    return 0


class SilentLog:
    """The metric logger of ranks other than 0: only rank 0 writes the run folder."""

    def write(self, **record) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def full_state_dict(module) -> dict:
    """The whole (unsharded) weights of an FSDP2 model on every rank, on the CPU, for saving."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload would hand the weights to rank 0 only; every rank needs them for the sharded final eval.
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
    return {name.removeprefix("model."): value.cpu() for name, value in state.items()}
