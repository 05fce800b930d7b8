"""Where one training step's time goes: torch.profiler over steps of bench/plan_gpu.py's set-up
(the method made trainable and the fast paths applied as `tunesmith train` does, random tokens),
the operators with the most device time first. Written for the question the first H200 run left
(tunesmith's QLoRA 25% slower than its LoRA, TRL's not): run it for qlora and lora and compare.

    python bench/gpu_profile.py --models /tmp/gpu-check-models --method qlora    # on a GPU
    python bench/gpu_profile.py --shape tiny --seq 256                           # anywhere (CPU times)
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_gpu import build, device_here, training  # noqa: E402


# What a kernel (on CUDA) or an operator (on the CPU, where there are no kernels) does, by its name;
# the first pattern that matches wins.
KINDS = [
    ("4-bit dequantise", r"dequant|bitsandbytes|bnb|4bit|nf4"),
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("matmul", r"gemm|cutlass|xmma|nvjet|cublas|aten::(mm|addmm|addmm_|bmm|baddbmm|matmul|linear)\b"),
    ("compiled element-wise", r"triton|torch-compiled|compiledfunction|compiledfx|inductor"),
    ("copies and casts", r"memcpy|memset|copy|aten::(to|_to_copy|contiguous|cat|clone|index|gather|scatter)\b"),
    ("eager element-wise and reductions", r"elementwise|vectorized|unrolled|reduce|aten::"),
]


@contextlib.contextmanager
def profiled(device):
    """torch.profiler around the block (device kernels too on CUDA); yields a list that holds, at the
    block's end, the profile as text (`breakdown`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    text: list[str] = []
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        began = time.perf_counter()
        yield text
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - began
    # device time well below the wall time: the GPU waited for the host (launches, synchronisations)
    try:
        text.append(f"wall time {wall * 1e3:.1f} ms (profiler on); " + breakdown(prof, cuda))
    except Exception as err:  # noqa: BLE001 (a profiler of another torch version: say so, keep the run)
        text.append(f"wall time {wall * 1e3:.1f} ms; no breakdown ({type(err).__name__}: {err})")


def breakdown(prof, cuda: bool, rows: int = 12) -> str:
    """Where the profiled time went: the share of each kind of work, then the costliest kernels
    (operators on the CPU), by their own time."""
    events = prof.key_averages()
    kernels = [e for e in events if cuda and str(getattr(e, "device_type", "")).endswith("CUDA")]
    if kernels:
        timed = [(e.key, e.self_device_time_total, e.count) for e in kernels]
    else:  # the CPU: the operators' own CPU time (device kernels were not recorded)
        timed = [(e.key, e.self_cpu_time_total, e.count) for e in events]
    timed = [t for t in timed if t[1] > 0]
    total = sum(t[1] for t in timed) or 1
    kinds: dict[str, float] = {}
    for name, us, _ in timed:
        kind = next((k for k, pattern in KINDS if re.search(pattern, name, re.IGNORECASE)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    lines = [f"{'device' if kernels else 'CPU'} time {total / 1e3:.1f} ms, by kind:"]
    lines += [f"  {share / total:6.1%}  {kind}" for kind, share in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines.append("costliest:")
    for name, us, count in sorted(timed, key=lambda t: -t[1])[:rows]:
        lines.append(f"  {us / total:6.1%} {us / 1e3:9.1f} ms x{count:<5} {name[:90]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--method", default="qlora")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after two unprofiled ones")
    parser.add_argument("--models", default=None, help="built models, MODELS/SHAPE (bench/gpu_compare.py --models)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.models or tmp) / args.shape
        build(args.shape, folder)
        case = {"shape": args.shape, "method": args.method, "batch": args.batch, "seq": args.seq,
                "ckpt": not args.no_checkpointing}
        device = device_here()
        step = training(case, folder, device)
        for _ in range(2):  # compiling and autotuning stay out of the profile
            step()
        with profiled(device) as text:
            for _ in range(args.steps):
                step()
    print(f"{args.shape} {args.method}, {args.batch} x {args.seq}, checkpointing {case['ckpt']}, {args.steps} steps")
    print(text[0])


if __name__ == "__main__":
    main()
