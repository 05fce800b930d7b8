"""Where a training step's time goes: torch.profiler over real steps of bench/train_speed.py's data.

Loads the default model as `tunesmith train` does (bf16 where fast, LoRA r=16 on all linear
layers, the same fused layers and attention), runs a few warm-up steps and then profiles the
next ones, and prints the operators that took the most time, grouped (frozen and low-rank
matmuls, attention, LM head, element-wise, autograd and the rest) with the GFLOP/s of each
matmul shape where the profiler counts FLOPs. The same number of steps runs unprofiled first,
for tokens/s without the profiler's overhead.

    OMP_NUM_THREADS=2 .venv/bin/python bench/profile_step.py --steps 3
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_speed import LORA, MAX_LEN, write_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--show", action="append", help="list the operators of this group too")
    parser.add_argument("--trace", help="write a Chrome trace here")
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from tunesmith import accel, methods
    from tunesmith.config import Config
    from tunesmith.data.collate import PADDED, PADDING_FREE
    from tunesmith.data.prepare import prepare
    from tunesmith.device import compute_dtype
    from tunesmith.models import load_tokenizer
    from tunesmith.training.distributed import StepLoss
    from tunesmith.training.step import optimizer_steps, train_step
    from tunesmith.training.memory import release_freed_memory
    from tunesmith.training.loss import label_loss_sum

    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), 96, 0, 0)
        cfg = Config.model_validate({
            "model": {"name": "default"}, "data": {"train": data["train"], "max_seq_len": MAX_LEN},
            "adapter": {"method": "lora", **LORA, "target_modules": "all-linear"},
            "train": {"batch_size": args.batch, "grad_accum": args.accum}})
        tokenizer = load_tokenizer("default")
        train = prepare(cfg.data, tokenizer).splits["train"]
    device = torch.device("cpu")
    method = methods.get("lora")
    model = method.make_trainable(method.load_base("default", compute_dtype("auto", device), device), cfg.adapter)
    accel.apply(model, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    layout = PADDING_FREE if accel.padding_free(model) else PADDED
    stream = optimizer_steps(train, cfg, layout)
    loss_module = StepLoss(model, label_loss_sum)
    model.train()

    def step() -> int:  # what training/loop.py fit does per optimizer step
        _, tokens = train_step(loss_module, train, next(stream), tokenizer.pad_token_id, layout=layout)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_freed_memory(device)
        return tokens

    for _ in range(args.warmup):
        step()
    # Unprofiled first: the profiler's own bookkeeping slows every operator a little.
    start, tokens = time.perf_counter(), sum(step() for _ in range(args.steps))
    seconds = time.perf_counter() - start
    print(f"{args.steps} steps, {tokens} tokens, {seconds:.2f} s, {tokens / seconds:.0f} tokens/s (not profiled)")
    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        start, tokens = time.perf_counter(), sum(step() for _ in range(args.steps))
    seconds = time.perf_counter() - start
    print(f"{args.steps} steps, {tokens} tokens, {seconds:.2f} s, {tokens / seconds:.0f} tokens/s (profiled)")
    events = prof.key_averages(group_by_input_shape=True)
    self_total = sum(e.self_cpu_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    flops: dict[str, float] = defaultdict(float)
    for e in events:
        groups[category(e.key, e.input_shapes)] += e.self_cpu_time_total
        flops[category(e.key, e.input_shapes)] += e.flops or 0
    print("\nself CPU time by group:")
    for name, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        rate = f"{flops[name] / us / 1e3:6.0f} GFLOP/s" if flops[name] else ""
        print(f"  {name:24s} {us / 1e3:9.0f} ms  {100 * us / self_total:5.1f}%  {rate}")
    print(f"\ntop {args.top} operators (self time, by input shapes):")
    rows = sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]
    for e in rows:
        rate = f"{e.flops / e.self_cpu_time_total / 1e3:6.0f} GFLOP/s" if e.flops else " " * 14
        print(f"  {e.self_cpu_time_total / 1e3:8.0f} ms {100 * e.self_cpu_time_total / self_total:5.1f}% "
              f"x{e.count:<5d} {rate} {e.key[:40]:40s} {str(e.input_shapes)[:90]}")
    for group in args.show or []:
        print(f"\n{group}:")
        picked = [e for e in events if category(e.key, e.input_shapes) == group]
        for e in sorted(picked, key=lambda e: -e.self_cpu_time_total)[:args.top]:
            print(f"  {e.self_cpu_time_total / 1e3:8.0f} ms x{e.count:<5d} {e.key[:50]:50s} {str(e.input_shapes)[:100]}")
    if args.trace:
        prof.export_chrome_trace(args.trace)


def category(name: str, shapes) -> str:
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"):
        dims = {d for shape in shapes if shape for d in shape}
        if name in ("aten::bmm", "aten::baddbmm"):
            return "matmul: attention"
        if any(d > 40_000 for d in dims):
            return "matmul: LM head"
        if any(d <= 64 for shape in shapes[:3] if len(shape) == 2 for d in shape):
            return "matmul: low rank"
        return "matmul: frozen"
    if "Compiled" in name or "compiled" in name or name.startswith("Torch-Compiled") or "inductor" in name.lower():
        return "compiled element-wise"
    if name.startswith("autograd::") or "Backward" in name:
        return "autograd"
    if name in ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous"):
        return "copies/casts"
    return "other aten"


if __name__ == "__main__":
    main()
