"""Where one training step's time goes: torch.profiler over steps of bench/plan_gpu.py's set-up
(the method made trainable and the fast paths applied as `tunesmith train` does, random tokens),
the operators with the most device time first. Written for the question the first H200 run left
(tunesmith's QLoRA 25% slower than its LoRA, TRL's not): run it for qlora and lora and compare.

    python bench/gpu_profile.py --models /tmp/gpu-check-models --method qlora    # on a GPU
    python bench/gpu_profile.py --shape tiny --seq 256                           # anywhere (CPU times)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from plan_gpu import build, device_here, training  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--method", default="qlora")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=2, help="profiled steps, after two unprofiled ones")
    parser.add_argument("--rows", type=int, default=25, help="operators listed")
    parser.add_argument("--models", default=None, help="built models, MODELS/SHAPE (bench/gpu_compare.py --models)")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.models or tmp) / args.shape
        build(args.shape, folder)
        case = {"shape": args.shape, "method": args.method, "batch": args.batch, "seq": args.seq,
                "ckpt": not args.no_checkpointing}
        device = device_here()
        step = training(case, folder, device)
        for _ in range(2):  # compiling and autotuning stay out of the profile
            step()
        cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
            if cuda:
                torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    print(f"{args.shape} {args.method}, {args.batch} x {args.seq}, checkpointing {case['ckpt']}, {args.steps} steps")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
