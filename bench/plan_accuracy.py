"""Predicted (tunesmith.plan) against measured peak training memory on this machine.

Each configuration runs in a fresh process: imports, load the model through tunesmith's loader
(NF4 for QLoRA), apply the adapter, then STEPS optimizer steps on random tokens the way
training/loop.py runs them (a micro-batch of `batch` sequences, padding-free as one row where
tunesmith's CPU attention is installed; label_loss_sum, loss / label count, backward, clipping,
AdamW, glibc's malloc_trim after each step; glibc's allocator settings as they are). Measured = the process's
peak resident memory (VmHWM) during those steps minus its resident memory after the imports,
before the model existed; the peak counter is reset after loading (/proc/self/clear_refs), so
one-off loading buffers do not count. Half of every sequence carries a label, like a chat prompt
followed by its answer. Predicted = tunesmith.plan's estimate for this machine (tensors plus
plan/devices.py cpu_overhead).

    .venv/bin/python bench/plan_accuracy.py            # the full table (about 20 minutes on 2 cores)
    .venv/bin/python bench/plan_accuracy.py --quick    # a few rows

Run it with the threads `tunesmith train` would use (all cores: no OMP_NUM_THREADS): resident
memory depends a little on the thread count.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

STEPS = 4  # from the second on, AdamW's states exist; resident memory varies a little from step to step
TINY = dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=4096)


def measure(case: dict) -> dict:
    """Runs inside the child process."""
    import bitsandbytes  # noqa: F401  (imported before the baseline: code, not training memory)
    import peft  # noqa: F401
    import torch
    from transformers import LlamaForCausalLM  # noqa: F401

    from tunesmith import accel, methods
    from tunesmith.config import AdapterConfig
    from tunesmith.data.collate import collate
    from tunesmith.data.tokenize import IGNORE, Encoded
    from tunesmith.plan import TrainingMemory
    from tunesmith.training.memory import release_freed_memory
    from tunesmith.training.loss import label_loss_sum

    torch.manual_seed(0)
    memory = TrainingMemory()  # what `tunesmith train` reports against the plan, measured the same way
    dtype = getattr(torch, case["dtype"])
    device = torch.device("cpu")
    method = methods.get(case["method"])
    model = method.load_base(case["model"], dtype, device)
    model = method.make_trainable(model, AdapterConfig(method=case["method"], gradient_checkpointing=case["ckpt"]))
    accel.apply(model, device)  # as api.train does
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=True)  # as training/loop.py builds it
    vocab = model.get_input_embeddings().weight.shape[0]
    memory.start()
    start = time.perf_counter()
    flat = accel.padding_free(model)  # as api.train decides it
    for _ in range(STEPS):
        ids = torch.randint(0, vocab, (case["batch"], case["seq"])).tolist()
        half = case["seq"] // 2
        examples = [Encoded(row, [IGNORE] * half + row[half:]) for row in ids]
        loss, count = label_loss_sum(model, collate(examples, 0, flat))
        (loss / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        release_freed_memory(device)
    return {"measured": memory.peak(), "seconds": time.perf_counter() - start}


def predict(case: dict) -> float:
    from tunesmith.plan import estimate_for_machine
    from tunesmith.plan.setup import Setup
    from tunesmith.plan.shapes import model_shape

    setup = Setup(method=case["method"], dtype=case["dtype"], batch=case["batch"], seq=case["seq"],
                  gradient_checkpointing=case["ckpt"], label_share=(case["seq"] // 2) / case["seq"])
    return estimate_for_machine(model_shape(case["model"]), setup).total


def cases(tiny: str, quick: bool) -> list[dict]:
    """Tiny model: every method x dtype x checkpointing at two lengths; default model: a spread."""
    rows = []
    tiny_seqs = (512,) if quick else (256, 1024)
    for method in ("full", "lora", "qlora"):
        for dtype in ("float32", "bfloat16"):
            for ckpt in (False, True):
                for seq in tiny_seqs:
                    rows.append(dict(name="tiny", model=tiny, method=method, dtype=dtype, ckpt=ckpt, batch=4, seq=seq))
    default = [(m, d, False, 256) for m in ("full", "lora", "qlora") for d in ("float32", "bfloat16")]
    default += [(m, "bfloat16", True, 512) for m in ("full", "lora", "qlora")] + [("lora", "bfloat16", False, 512)]
    for method, dtype, ckpt, seq in default[::3] if quick else default:
        rows.append(dict(name="default", model="default", method=method, dtype=dtype, ckpt=ckpt, batch=2, seq=seq))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    from transformers import AutoModelForCausalLM, LlamaConfig

    with tempfile.TemporaryDirectory() as folder:
        AutoModelForCausalLM.from_config(LlamaConfig(**TINY)).save_pretrained(folder)
        print(f"{'model':<8}{'method':<7}{'dtype':<10}{'ckpt':<6}{'batch':>6}{'seq':>6}"
              f"{'predicted MiB':>15}{'measured MiB':>14}{'error':>8}{'step s':>8}", flush=True)
        worst = 0.0
        for case in cases(folder, args.quick):
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{case['name']} {case['method']} {case['dtype']}: failed\n{done.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            predicted = predict(case)
            error = predicted / result["measured"] - 1
            worst = max(worst, abs(error))
            print(f"{case['name']:<8}{case['method']:<7}{case['dtype']:<10}{'on' if case['ckpt'] else 'off':<6}"
                  f"{case['batch']:>6}{case['seq']:>6}{predicted / 2**20:>15.0f}{result['measured'] / 2**20:>14.0f}"
                  f"{error:>+8.0%}{result['seconds'] / STEPS:>8.1f}", flush=True)
        print(f"largest error: {worst:.0%}")


if __name__ == "__main__":
    main()
