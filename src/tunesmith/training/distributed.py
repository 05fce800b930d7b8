"""Several processes, one per device, on torch.distributed: launched by torchrun.

Every rank builds the same global order of micro-batches and takes its own slice of each one, so
the examples of an optimizer step are the same as in one process. The loss is divided by the
label-token count of the whole step over all ranks (known on every rank from the data, no
communication needed), and the gradients are summed across ranks: the update equals one
process's with the same global batch, whatever the number of ranks.

Adapters and small models are replicated with DistributedDataParallel; `train.fsdp` shards the
weights with FSDP2 (`fully_shard`): a full fine-tune's weights, gradients and optimizer state, or
an adapter run's frozen base (so a base too large for one device trains LoRA on several), in
bf16 on CUDA with gradients reduced in fp32, optionally offloaded to the CPU (`train.fsdp_offload`).
On CUDA the process group has two backends: NCCL for device tensors (gradients, a step's sums), gloo
for host ones (`Ranks`' sums of host numbers, objects, barriers, and FSDP2's gradient norm of shards
offloaded to host memory, which NCCL refuses). Host numbers so never wait for the device's queue.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    device: torch.device = torch.device("cpu")  # where the collectives of device tensors put them (sum_tensor)
    host: torch.device = torch.device("cpu")  # where those of host numbers and objects do: the group's CPU backend

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
        """Sums over all ranks (the values themselves in one process). Host numbers, summed on the host:
        through CUDA each was a copy to the device and a read back, waiting for all work queued there."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self.host)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def sum_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor summed over all ranks, on its device (no host read); itself in one process."""
        if not self.active:
            return tensor
        summed = tensor.to(self.device)
        dist.all_reduce(summed)
        return summed.to(tensor.device)

    def most(self, value: float) -> float:
        """The largest of the ranks' values (the value itself in one process)."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.host)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.item()

    def broadcast(self, value):
        """Rank 0's value (any picklable object) on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.host)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's value (any picklable object), in rank order, on every rank."""
        if not self.active:
            return [value]
        gathered = [None] * self.world
        dist.all_gather_object(gathered, value)
        return gathered

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (signals arrive per process)."""
        return bool(self.sum(float(flag))[0]) if self.active else flag

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


SINGLE = Ranks()
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


# On CUDA: NCCL for CUDA tensors and gloo beside it for CPU ones, as torch's own default group on a
# GPU machine (init_process_group without a backend). NCCL alone refused the CPU tensors of FSDP2's
# offloaded shards (train.fsdp_offload): their gradient norm ended the first step with "No backend
# type associated with device type cpu" (pytorch/pytorch#148532).
CUDA_BACKENDS = "cpu:gloo,cuda:nccl"


def setup(device_spec: str = "auto") -> Ranks:
    """The process group of a torchrun launch (NCCL with gloo beside it where the run computes on
    CUDA, else gloo); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available() and device_spec != "cpu"
        if cuda:  # the device the run computes on (device.resolve): NCCL's and every CUDA collective's
            from ..device import resolve

            torch.cuda.set_device(resolve(device_spec, local_rank))
        # Rank 0 alone scores the base before training and the result after it while the others wait
        # in a collective: with a large test set or the general probe that passed gloo's 30-minute
        # default (NCCL's is shorter) and the job was killed with its work done.
        dist.init_process_group(CUDA_BACKENDS if cuda else "gloo", timeout=COLLECTIVE_TIMEOUT)
    backend = str(dist.get_backend())
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    host = torch.device("cpu") if backend == "gloo" or "cpu:" in backend else device
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank, device=device, host=host)


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


def wrap(model, loss_fn, ranks: Ranks, fsdp: bool, offload: bool = False):
    """(module computing the loss, gradient scale): DDP averages gradients over ranks, so each rank's
    loss is scaled by the world size to make the average a sum; FSDP2 reduce-scatters likewise."""
    root = _SHARDED_AT_LOAD.pop(model, None)  # popped: the root holds the model, which would never be freed
    if root is not None:  # sharded before its weights were loaded (training/sharded_start.py)
        root.loss_fn = loss_fn
        return root, float(ranks.world)
    module = StepLoss(model, loss_fn)
    if not ranks.active:
        return module, 1.0
    device = next(model.parameters()).device
    if fsdp:
        ranks.fsdp = True
        shard(model, module, ranks, device, offload)
        # offloaded shards wait in host memory: where they compute is recorded (device.compute_device)
        model._tunesmith_device = module._tunesmith_device = device
        return module, float(ranks.world)
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # gradients as views of DDP's buckets: reduced in place, not copied (one gradients' worth less per device)
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True), float(ranks.world)


# model -> its FSDP2 root, for models sharded on the meta device before their weights were loaded
_SHARDED_AT_LOAD: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shard_at_load(model, loss_fn, ranks: Ranks, device: torch.device, offload: bool) -> StepLoss:
    """The root module of `model` sharded now (its weights still to be loaded), computing `loss_fn`
    until `wrap` returns it with the run's."""
    root = StepLoss(model, loss_fn)
    ranks.fsdp = True
    shard(model, root, ranks, device, offload)
    _SHARDED_AT_LOAD[model] = root
    # offloaded shards wait in host memory: where they compute is recorded (device.compute_device)
    model._tunesmith_device = root._tunesmith_device = device
    return root


def reshard(module) -> None:
    """FSDP2 leaves the root's weights gathered after a forward without a backward, registered in
    place of its shards: sharded again, so that what reads or writes the parameters next (the
    optimizer as it is built, the best weights kept or restored) sees the shards."""
    if hasattr(module, "reshard"):
        module.reshard()


def shard(model, module, ranks: Ranks, device: torch.device, offload: bool) -> None:
    """FSDP2 over the decoder layers, the wrapper as the root (embeddings, final norm and LM head
    are gathered around its forward). On CUDA parameters are gathered in bf16 and gradients
    reduced in fp32; frozen base weights (adapter methods) are sharded like the rest."""
    from dataclasses import replace

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = init_device_mesh(device.type, (ranks.world,))
    options = {"mesh": mesh}
    policy = mixed_precision(device)
    if policy is not None:
        options["mp_policy"] = policy
    if offload:  # pinned host memory needs an accelerator; on CPU ranks the shards stay where they are
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in base.get_decoder().layers:
        fully_shard(layer, **options)
    # The root's input is the batch, whose floating-point values (reference log-probabilities, advantages,
    # sequence lengths) FSDP2 would cast to bf16 (-300.3 becomes -300); its weights make bf16 activations.
    fully_shard(module, **{**options, **({"mp_policy": replace(policy, cast_forward_inputs=False)} if policy else {})})


def mixed_precision(device: torch.device):
    """FSDP2's mixed precision on `device`: on CUDA bf16 weights in the forward and backward, gradients
    reduced in fp32; None elsewhere (the weights' own dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


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


STOP_GRACE_SECONDS = 600


def launch(nproc: int, argv: list[str]) -> int:
    """`tunesmith train --nproc N ...`: the same command under torchrun with N processes. Rank 0 speaks
    on the terminal; the other ranks, which would say the same lines again, into log files, read
    back where one of them fails."""
    import logging
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from ..entry import SAFE_ENTRY

    # A stop (Ctrl-C, SIGTERM to torchrun) lets the ranks finish their step and write a checkpoint;
    # torchrun kills them after 30 s unless told otherwise, too short for a large model's checkpoint.
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_GRACE_SECONDS))
    # torchrun's own default, 1 thread per rank (said in a banner), leaves a CPU run's other cores idle
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // nproc)))
    os.environ[LAUNCHED] = "1"  # the ranks hand a user's mistake to failure_status (tell_launcher)
    with tempfile.TemporaryDirectory(prefix="tunesmith-ranks-") as logs:
        quiet = ",".join(f"{rank}:3" for rank in range(1, nproc))  # 3: stdout and stderr
        # Not `-m tunesmith.cli`: each rank would import modules from the working folder first.
        args = ["--standalone", f"--nproc_per_node={nproc}", f"--log-dir={logs}", f"--redirects={quiet}",
                "--no-python", sys.executable, "-c", SAFE_ENTRY, *argv]
        logging.disable(logging.ERROR)  # torchrun's log lines of a failure: said once, below
        try:
            torchrun(args)
        except SystemExit as done:
            return int(done.code or 0)
        except SignalException as stop:  # the ranks were stopped with it and said where they checkpointed
            return 128 + int(stop.sigval)
        except ChildFailedError as failed:  # torchrun has already ended every rank
            return failure_status(failed.failures, Path(logs))
        except Exception as err:  # noqa: BLE001 (the launch itself: a port taken, a rendezvous that failed)
            print(f"error: distributed run failed: {type(err).__name__}: {' '.join(str(err).split())}", file=sys.stderr)
            return 1
        finally:
            logging.disable(logging.NOTSET)
    return 0


LAUNCHED = "TUNESMITH_LAUNCHER"


def tell_launcher(message: str) -> bool:
    """A rank of `train --nproc` writes its error line into torchrun's error file for failure_status to
    say once (every rank said it, their lines glued into one); False elsewhere: the caller says it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or not os.environ.get(LAUNCHED):
        return False
    with open(path, "w", encoding="utf-8") as out:
        json.dump({"message": message, "timestamp": int(time.time())}, out)
    return True


def failure_status(failures: dict, logs: Path) -> int:
    """The exit status of a run some ranks failed, said once: 2 where each exited with a user's mistake
    (its `error: ...` line, status 2, as one process), else 1 with the rank and how it ended."""
    ended_by_torchrun = {rank for rank, failure in failures.items() if failure.exitcode == -signal.SIGTERM}
    causes = {rank: f for rank, f in failures.items() if rank not in ended_by_torchrun} or failures
    said = {f.message for f in causes.values() if isinstance(f.message, str) and f.message.startswith("error: ")}
    if said and all(failure.exitcode == 2 for failure in causes.values()):
        print("\n".join(sorted(said)), file=sys.stderr)  # the same mistake found by every rank: one line
        return 2
    rank, failure = min(causes.items(), key=lambda item: (item[1].exitcode == 2, item[1].timestamp, item[0]))
    if rank != 0:  # what it said before it ended (a traceback); rank 0's is on the terminal
        print("\n".join(rank_output(logs, rank)[-20:]), file=sys.stderr)
    ended = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
    print(f"error: distributed run failed: rank {rank} {ended}", file=sys.stderr)
    return 1


def rank_output(logs: Path, rank: int) -> list[str]:
    """The lines a rank other than 0 wrote to stderr (torchrun's <logs>/<run>/attempt_<n>/<rank>/)."""
    found = sorted(logs.glob(f"*/attempt_*/{rank}/stderr.log"))
    return found[-1].read_text(errors="replace").splitlines() if found else []


class SilentLog:
    """The metric logger of ranks other than 0: only rank 0 writes the run folder."""

    def write(self, **record) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def gathered_state(module, trainable_only: bool) -> dict:
    """The unsharded weights of an FSDP2 model (only the trained ones for adapter methods), on the
    CPU of rank 0 alone; other ranks get an empty dict. Every rank must call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    state = get_model_state_dict(module, options=options)
    # Tied weights (lm_head = embed_tokens) come twice in a state dict, once as parameters: keep the parameters.
    wanted = {name for name, p in module.named_parameters() if p.requires_grad or not trainable_only}
    return {name.removeprefix("model."): value for name, value in state.items() if name in wanted}
