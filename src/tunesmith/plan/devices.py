"""Devices a plan can be checked against: common GPUs and this machine.

Memory is the card's nominal size; peaks are dense (no sparsity) tensor-core figures from the
vendors' data sheets, in TFLOP/s. What a GPU run needs beyond its tensors (the CUDA context and
the caching allocator's slack) is the device's overhead.
"""
from __future__ import annotations

import re
import sys

from dataclasses import dataclass, replace

GiB = 2**30
CUDA_CONTEXT = 0.5 * GiB
ALLOCATOR_SLACK = 0.05  # share of the tensors the CUDA caching allocator holds on top
CPU_RUNTIME = 110 * 2**20  # thread pools, oneDNN scratch, compiled kernels, autograd's graph (measured)
# glibc heap blocks freed but still resident at a step's peak, per byte of the step's activations
# (cpu_overhead), fitted to bench/plan_accuracy.py's rows, by activation dtype (fp32, bf16/fp16):
# full fine-tuning; LoRA and QLoRA (accel/lora_linear.py); adapters through PEFT's own layers
# (DoRA), which free three activation-sized temporaries per layer.
RESIDENT = {"full": {4: 0.9, 2: 0.6}, "lora": {4: 0.6, 2: 0.5}, "peft": {4: 1.25, 2: 0.5}}
MMAP_CEILING = 32 * 2**20  # glibc's dynamic mmap threshold stops here: larger blocks are unmapped when freed
SCORES_KEPT_FROM = 8 * 2**20  # one sequence's score matrix from which freed ones stay resident (resident_scores)


def gib(value: float) -> str:
    return f"{value / GiB:.2f} GiB"


@dataclass(frozen=True)
class Device:
    name: str
    memory: float  # bytes
    bf16_tflops: float | None  # None: no fast bf16 (the plan then uses fp16 or fp32 figures)
    fp32_tflops: float
    is_cpu: bool = False

    def overhead(self, tensors: float) -> float:
        """What a GPU needs beyond `tensors` bytes (CPUs: cpu_overhead, from the whole estimate)."""
        return CUDA_CONTEXT + ALLOCATOR_SLACK * tensors

    def auto_dtype(self, fallback: str) -> str:
        """What model.dtype: auto trains in here (device.compute_dtype's rule): bf16 on a GPU with
        bf16 tensor cores and on a CPU that multiplies bf16 fast, else fp32; `fallback` on a
        device known by its memory alone."""
        if self.is_cpu:
            import torch

            from ..device import bf16_is_fast

            return "bfloat16" if bf16_is_fast(torch.device("cpu")) else "float32"
        if self.bf16_tflops is None and not self.fp32_tflops:
            return fallback
        return "bfloat16" if self.bf16_tflops else "float32"

    def peak_flops(self, dtype: str) -> float:
        if dtype == "float32" or self.bf16_tflops is None:
            return self.fp32_tflops * 1e12
        return self.bf16_tflops * 1e12


GPUS = {
    "t4": Device("T4 16 GB", 16 * GiB, None, 8.1),
    "l4": Device("L4 24 GB", 24 * GiB, 121, 30.3),
    "a10": Device("A10 24 GB", 24 * GiB, 125, 31.2),
    "rtx4090": Device("RTX 4090 24 GB", 24 * GiB, 165, 82.6),
    "a100-40gb": Device("A100 40 GB", 40 * GiB, 312, 19.5),
    "a100-80gb": Device("A100 80 GB", 80 * GiB, 312, 19.5),
    "h100": Device("H100 80 GB", 80 * GiB, 989, 67),
    "h200": Device("H200 141 GB", 141 * GiB, 989, 67),
}


# Share of a device's memory a run's planned peak may take: `plan` says a run fits within it and
# `train`'s auto checkpointing keeps to it (training/recompute.py). The plan came within 1% of the
# allocated peak on an H200 and within 3-18% on this CPU (bench/RESULTS.md); the rest is for the
# caching allocator's fragmentation, the CUDA context and what other processes start meanwhile.
HEADROOM = 0.9


def cpu_overhead(est) -> float:
    """Resident memory on top of the tensors of `est` (a memory.Estimate) in a CPU training run.

    - The runtime: thread pools, oneDNN scratch, torch.compile's compiler and kernels, autograd's
      graph (CPU_RUNTIME, measured). bitsandbytes' CPU backend adds nothing measurable once the
      library is imported (bench/plan_accuracy.py 2026-12-04: QLoRA's peak minus LoRA's equals
      their weights' difference within the rows' spread), and the import is not training memory.
    - glibc's allocator: tensors below its mmap threshold (up to 32 MiB) live in its heap, where
      a freed block stays resident until training/loop.py's malloc_trim after the optimizer step,
      and later tensors of other sizes rarely reuse it: resident memory runs ahead of the live
      tensors during a step. Measured with bench/plan_accuracy.py (glibc 2.36, this machine), the
      excess follows the activations a step allocates, with or without checkpointing (a
      checkpointed block allocates the same tensors and frees them sooner, which glibc does not
      exploit), in proportion to the no-checkpointing activations (RESIDENT): 0.9x (fp32) and
      0.6x (bf16) in full fine-tuning, 0.6x and 0.5x with plain LoRA, and 1.25x and 0.5x with
      PEFT's own adapter layers (DoRA), which also free three activation-sized
      temporaries each (the frozen layer's output, the adapter's output and its scaled copy). An
      empirical term: it leaves -16%..+10% on the bench's rows, and one configuration's peak
      moves by 5-10% from step to step and run to run (a cold torch.compile cache adds some).
    - Freed attention-score buffers of a padding-free row kept in glibc's heap (resident_scores).
    """
    from .memory import dtypes
    from .setup import _method

    setup = est.setup
    allocated = est.activations_no_ckpt + est.weight_copies
    method = _method(setup)
    # LoRA and QLoRA run accel/lora_linear.py's layers; DoRA PEFT's own
    kind = "full" if method.trains_all_weights else "peft" if method.weight_norms else "lora"
    share = RESIDENT[kind][dtypes(setup).inner]
    return CPU_RUNTIME + share * allocated + resident_scores(est)


def resident_scores(est) -> float:
    """Freed attention-score buffers that glibc keeps in its heap during a padding-free step.

    A padding-free row attends one sequence at a time (memory.attention_scores counts one). Where
    one sequence's score matrix is large but below glibc's mmap ceiling, its freed buffers stay in
    the heap: on the bench's rows (tiny model, 4 sequences a row) 16 MiB matrices (bf16, 1024
    tokens) kept about half the row's sequences' worth resident, the attention's working set per
    score (8 bytes in the forward, 3 x its dtype in the backward) for batch / 2 - 1 more
    sequences; 4 MiB ones (512 tokens) nothing measurable, and 32 MiB ones (fp32, 1024 tokens)
    are unmapped when freed. Fitted, like RESIDENT, between SCORES_KEPT_FROM and the ceiling."""
    from .memory import attention_scores, dtypes

    setup = est.setup
    scores = attention_scores(est.shape, setup)
    inner = dtypes(setup).inner
    if not scores or setup.packed_rows or not SCORES_KEPT_FROM <= scores * inner < MMAP_CEILING:
        return 0.0
    working_set = max(8, 3 * inner)  # bytes per score, forward or backward (memory.py)
    return max(0.0, setup.batch / 2 - 1) * working_set * scores


def this_machine() -> Device:
    """Where `train.device: auto` trains here: the first GPU where CUDA is available, else this CPU
    (its memory, and a matrix-multiply peak measured now)."""
    import torch

    if torch.cuda.is_available():
        gpu = gpu_of(torch.device("cuda", 0))
        return replace(gpu, name=f"this machine: {gpu.name}")
    return this_cpu()


def this_cpu() -> Device:
    """This machine's processor: its memory, and a matrix-multiply peak measured now."""
    import psutil

    from .speed import matmul_peak

    return Device("this machine", float(psutil.virtual_memory().total), matmul_peak("bfloat16") / 1e12,
                  matmul_peak("float32") / 1e12, is_cpu=True)


# Cards named otherwise that the plan takes as one in the table: AWS's A10G as the A10 (as before whole-word
# matching; its own data-sheet peaks are lower and not in the table).
SAME_PEAKS = {"a10g": "a10"}


def gpu_of(device) -> Device:
    """The plan's Device for a CUDA device: its real memory, and the data-sheet peak where known."""
    import torch

    props = torch.cuda.get_device_properties(device)
    # Whole words of the model ("RTX 4090" of "RTX 4090 24 GB"): "A10" is in "A100", "L4" in "L40S".
    words = set(re.split(r"[^a-z0-9]+", props.name.lower()))
    words |= {SAME_PEAKS[w] for w in words if w in SAME_PEAKS}
    known = next((d for d in GPUS.values() if {w.lower() for w in d.name.split()[:-2]} <= words), None)
    return Device(props.name, float(props.total_memory), known.bf16_tflops if known else None,
                  known.fp32_tflops if known else 0.0)


def find_device(name: str) -> Device:
    from ..errors import UserError

    key = name.lower().replace(" ", "").replace("_", "-")
    if key in ("this", "this-machine", "local"):
        return this_machine()
    if key == "cpu":  # this machine's processor, also where it has a GPU
        return this_cpu()
    if key in GPUS:
        return GPUS[key]
    for device in GPUS.values():
        if device.name.lower().replace(" ", "").startswith(key):
            return device
    raise UserError(f"unknown device '{name}'; known: {', '.join(GPUS)}, this-machine")


def resident(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process in bytes; elsewhere than Linux, the peak from getrusage."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * float(scale)
