"""The plan of a run about to start: its real micro-batches on its device (`run_setup`, drawn
once; `tunesmith train` prints its estimate, and `adapter.gradient_checkpointing: auto` picks
the blocks to checkpoint from it), and what the run itself measures to set against it."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .devices import CUDA_CONTEXT, Device, gib, gpu_of, resident
from .memory import Estimate
from .objectives import counted_setup, label_share, trained_lengths
from .setup import Setup
from .setups import estimate_for_machine, estimate_on, fewest_checkpointed, setup_from_config
from .shapes import ModelShape, model_shape
from .speed import flops_per_token


def first_steps(split, cfg, layout: str, steps: int) -> list[list[list[int]]]:
    """The micro-batches of the run's first `steps` optimizer steps (at most an epoch's): the same
    stream training draws from."""
    from ..training.step import optimizer_steps

    stream = optimizer_steps(split, cfg, layout)
    per_epoch = max(1, -(-len(split.encoded) // (cfg.train.batch_size * cfg.train.grad_accum)))
    return [next(stream) for _ in range(min(steps, per_epoch))]


def largest_micro_batch(split, cfg, layout: str, steps: int) -> tuple[int, int, int]:
    """(sequences, longest sequence, tokens computed) of the largest micro-batch of the run's first
    `steps` optimizer steps, each example counted as the sequences its objective trains on
    (plan/objectives.py)."""
    return _largest_of(first_steps(split, cfg, layout, steps), split, cfg, layout)


def _batches(drawn: list[list[list[int]]], split, cfg, layout: str):
    """(sequences' lengths, the row width, tokens computed) of each drawn micro-batch: rows are rounded
    up (data/collate.py rounded_up), and padded rows compute their padding."""
    from ..data.collate import PADDING_FREE, rounded_up

    for step in drawn:
        for batch in step:
            sizes = [n for i in batch for n in trained_lengths(split.encoded[i], cfg.train, cfg.data.max_seq_len)]
            width = rounded_up(max(sizes))
            yield sizes, width, rounded_up(sum(sizes)) if layout == PADDING_FREE else len(sizes) * width


def _largest_of(drawn: list[list[list[int]]], split, cfg, layout: str) -> tuple[int, int, int]:
    from ..data.collate import PADDING_FREE

    best = (1, 1, 0)
    for sizes, width, tokens in _batches(drawn, split, cfg, layout):
        if tokens > best[2]:
            best = (len(sizes), max(sizes) if layout == PADDING_FREE else width, tokens)
    return best


def padding_factor(split, cfg, layout: str, steps: int) -> float:
    """Tokens computed per token trained over the run's first steps (at most an epoch): above 1 where
    padded rows compute their padding, which the epoch time has to count too."""
    sizes_and_computed = [(sum(sizes), computed) for sizes, _, computed in
                          _batches(first_steps(split, cfg, layout, steps), split, cfg, layout)]
    trained = sum(n for n, _ in sizes_and_computed)
    return sum(c for _, c in sizes_and_computed) / trained if trained else 1.0


@dataclass
class RunSetup:
    """The plan's view of the run about to start."""
    shape: ModelShape
    setup: Setup
    target: Device | None  # the GPU it runs on; None: this machine's CPU
    tokens: int  # of the largest micro-batch


def run_setup(cfg, train_split, layout: str, device, devices: int = 1) -> RunSetup:
    """The run's real micro-batches and label share, on the device it runs on, one of `devices`
    (torchrun's processes; under train.fsdp their shards, plan/sharding.py)."""
    setup, tokens = with_drawn_micro_batches(cfg, train_split, layout, setup_from_config(
        cfg, label_share(train_split.encoded, cfg.train, cfg.data.max_seq_len), device, devices))
    shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
    target = gpu_of(device) if device.type == "cuda" else None
    if target:
        setup = replace(setup, head_chunk=cuda_head_chunk(shape))
    return RunSetup(shape, setup, target, tokens)


def with_drawn_micro_batches(cfg, train_split, layout: str, setup: Setup) -> tuple[Setup, int]:
    """(`setup` with the largest micro-batch of the run's steps, as training draws them in place of
    the config's worst case of every sequence at max_seq_len, that micro-batch's tokens)."""
    from ..data.collate import PACKED, PADDING_FREE
    from ..training.step import total_steps

    drawn = first_steps(train_split, cfg, layout, total_steps(cfg, len(train_split)))
    sequences, longest, tokens = _largest_of(drawn, train_split, cfg, layout)
    # Padding-free, a step of short examples may be one micro-batch whatever train.grad_accum says:
    # gradients are held across micro-batches only where a step has several.
    accumulating = max(len(step) for step in drawn)
    return counted_setup(cfg, replace(setup, batch=sequences, seq=longest, packed_rows=layout == PACKED,
                                      tokens=tokens if layout == PADDING_FREE else None,
                                      grad_accum=accumulating)), tokens


def with_checkpointing(setup: Setup, layers: int | None) -> Setup:
    """The setup with its first `layers` blocks checkpointed (None: as configured)."""
    return setup if layers is None else replace(setup, gradient_checkpointing=layers > 0, checkpoint_layers=layers)


def measurable(run: RunSetup, setup: Setup) -> tuple[float, Estimate]:
    """(bytes comparable with what the run measures, the estimate): on a GPU the tensors, set
    against allocated memory; on the CPU resident memory, the allocator's overhead included."""
    if run.target is None:
        est = estimate_for_machine(run.shape, setup)
        return est.total, est
    est = estimate_on(run.shape, setup, run.target)
    return est.total - est.parts["framework overhead"], est


def estimated(run: RunSetup, checkpoint_layers: int | None = None) -> tuple[float, str]:
    """(predicted peak bytes, one line) for the run about to start, with `checkpoint_layers`
    blocks checkpointed (None: as configured)."""
    predicted, est = measurable(run, with_checkpointing(run.setup, checkpoint_layers))
    biggest = sorted(((v, k) for k, v in est.parts.items() if v > 0 and k != "framework overhead"), reverse=True)[:3]
    parts = ", ".join(f"{k} {gib(v)}" for v, k in biggest)
    if not run.target:
        return predicted, f"plan: peak about {gib(predicted)} for micro-batches of up to {run.tokens} tokens ({parts})"
    # The card must also hold the CUDA context and the caching allocator's slack.
    return predicted, (f"plan: peak about {gib(predicted)} allocated for micro-batches of up to {run.tokens} tokens "
                       f"({parts}); {gib(est.total)} with the CUDA context and allocator slack, of "
                       f"{gib(run.target.memory)} on {run.target.name}")


def run_estimate(cfg, train_split, layout: str, device, checkpoint_layers: int | None = None) -> tuple[float, str]:
    """`estimated` from the run's config and data."""
    return estimated(run_setup(cfg, train_split, layout, device), checkpoint_layers)


def fewest_within(run: RunSetup, budget: float) -> int | None:
    """The fewest leading blocks to checkpoint for the run's planned peak (on a GPU with the
    caching allocator's slack) to stay within `budget` bytes; None where checkpointing every block
    is not enough."""

    def needed(setup: Setup) -> float:  # on a GPU with the allocator's slack (the context is in use already)
        predicted, est = measurable(run, setup)
        return predicted if run.target is None else est.total - CUDA_CONTEXT

    return fewest_checkpointed(run.shape, run.setup, lambda s: needed(s) <= budget)


def utilisation_of(cfg, train_split, device):
    """tokens/s -> model FLOPs utilisation of the run: the model's FLOPs per token for its method and
    data (plan/speed.py; checkpointing's recomputed forward not counted) over the device's dense
    peak in the run's dtype (the data sheet's for known GPUs, the measured matmul peak on the CPU);
    None where no peak is known."""
    from ..device import compute_dtype
    from .speed import matmul_peak

    lengths = [len(e.input_ids) for e in train_split.encoded]
    labels = sum(e.label_count for e in train_split.encoded)
    setup = setup_from_config(cfg, labels / max(1, sum(lengths)), device)
    shape = model_shape(cfg.model.name, cfg.model.trust_remote_code)
    dtype = str(compute_dtype(cfg.model.dtype, device)).replace("torch.", "")
    if device.type == "cuda":
        peak = gpu_of(device).peak_flops(dtype) if gpu_of(device).fp32_tflops else 0.0
    else:
        peak = matmul_peak(dtype)
    if not peak:
        return None
    per_token = flops_per_token(shape, setup, sum(lengths) / max(1, len(lengths)), recompute=False)
    return lambda tokens_per_second: tokens_per_second * per_token / peak


def cuda_head_chunk(shape: ModelShape) -> int:
    from ..training.loss import head_chunk

    return head_chunk(shape.vocab, "cuda")


def _settled_resident() -> float:
    """Resident memory once garbage is collected and glibc has handed its free blocks back: what
    the process holds before a run, not what earlier work (a test, a previous run) left free."""
    import gc

    from ..training.memory import release_freed_memory

    gc.collect()
    release_freed_memory(__import__("torch").device("cpu"))
    return resident("VmRSS")


class TrainingMemory:
    """What a training run itself takes, to set against the plan: on a GPU the peak of allocated
    CUDA memory on the run's device; on the CPU the peak resident memory during training minus the
    resident memory before the model was loaded (the interpreter and libraries are not training
    memory; the plan and bench/plan_accuracy.py count the same way)."""

    def __init__(self, device=None):
        import torch

        self.device = torch.device(device or "cpu")
        self.cuda = self.device.type == "cuda"
        self.baseline = 0.0 if self.cuda else _settled_resident()

    def start(self) -> None:
        """Forget the peak so far (loading buffers, the base model's evaluation)."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # What the base's scoring freed goes back first: else the peak starts from its leftovers (the
        # demo, 2026-12-06: 1.43 GiB measured against 1.15 planned, its step-10 peak already there).
        _settled_resident()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # the peak resident size becomes the current one
        except OSError:
            pass  # not Linux: the peak keeps what came before

    def peak(self) -> float:
        import torch

        if self.cuda:
            return float(torch.cuda.max_memory_allocated(self.device))
        return resident("VmHWM") - self.baseline

    def details(self) -> dict:
        """The device's own figures beside the peak (GPU: allocated and reserved)."""
        import torch

        if not self.cuda:
            return {"kind": "resident memory (CPU)"}
        return {"kind": "allocated (CUDA)", "reserved": float(torch.cuda.max_memory_reserved(self.device))}
