"""`tunesmith plan` against the CUDA memory a real training step allocates: six set-ups on four
shapes (Llama-3.1-8B QLoRA, LoRA and QLoRA with bf16 adapters and offloaded activations,
Llama-3.2-3B, Llama-3.2-1B, TinyLlama 1.1B fully fine-tuned),
with and without gradient checkpointing. The 8B model is reused from bench/gpu_compare.py's
--models folder where it is there; the small ones are built in seconds.

Each case runs in a fresh process: a random model of the shape (weights do not change memory),
the method made trainable and the fast paths applied as `tunesmith train` does, then three
optimizer steps of random tokens through training/step.py's train_step, of `accum` micro-batches
each (the 8B rows as the comparison runs them, the full fine-tune's with its gradients held across
two); measured is
torch.cuda.max_memory_allocated after the first step (so the optimizer states exist), predicted
the plan's tensors (its CUDA-context and allocator-slack overhead left out: allocated memory
does not contain them).

    python bench/plan_gpu.py            # on a GPU
    python bench/plan_gpu.py --quick    # tiny shapes; runs on a CPU (resident memory, as train measures)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = [
    {"shape": "llama-3.1-8b", "method": "qlora", "batch": 2, "seq": 2048, "ckpt": True, "accum": 4},
    # the first 16 of 32 blocks checkpointed (adapter.gradient_checkpointing: 16, or what 'auto' takes on a 32 GB card)
    {"shape": "llama-3.1-8b", "method": "lora", "batch": 2, "seq": 2048, "ckpt": 16, "accum": 4},
    # TRL's QLoRA set-up (bf16 adapters), the checkpointed inputs in host memory (adapter.offload_activations)
    {"shape": "llama-3.1-8b", "method": "qlora", "batch": 2, "seq": 2048, "ckpt": True, "accum": 4,
     "adapters": "bfloat16", "offload": True},
    {"shape": "llama-3.2-3b", "method": "lora", "batch": 4, "seq": 1024, "ckpt": False, "accum": 1},
    {"shape": "llama-3.2-1b", "method": "qlora", "batch": 1, "seq": 4096, "ckpt": False, "accum": 1},
    {"shape": "tinyllama-1.1b", "method": "full", "batch": 2, "seq": 1024, "ckpt": True, "accum": 2},
]
QUICK = [{**case, "shape": "tiny", "seq": case["seq"] // 8} for case in CASES]


def device_here():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def training(case: dict, folder: Path, device):
    """The case's model on `device`, made trainable with the fast paths applied as `tunesmith
    train` does, and `step()`: one optimizer step of random tokens through training/loop.py's
    train_step (half of each row labelled)."""
    import torch

    from tunesmith import accel, methods
    from tunesmith.config import AdapterConfig
    from tunesmith.data.collate import PADDED, PADDING_FREE
    from tunesmith.data.prepare import Split
    from tunesmith.data.tokenize import IGNORE, Encoded
    from tunesmith.training.distributed import StepLoss
    from tunesmith.training.step import train_step
    from tunesmith.training.loss import label_loss_sum
    from tunesmith.training import recompute
    from tunesmith.training.offload import offloaded

    method = methods.get(case["method"])
    model = method.load_base(str(folder), torch.bfloat16, device)
    model = method.make_trainable(model, AdapterConfig(method=case["method"], r=32, alpha=64,
                                                       dtype=case.get("adapters", "float32"),
                                                       offload_activations=case.get("offload", False),
                                                       gradient_checkpointing=case["ckpt"]))
    if case["ckpt"] is not True and case["ckpt"]:  # the first k blocks, as `tunesmith train` does
        recompute.checkpoint_first(model, case["ckpt"])
    accel.apply(model, device)
    layout = PADDING_FREE if accel.padding_free(model) else PADDED
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    vocab = model.get_input_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(3, vocab, (case["batch"], case["seq"]), generator=generator).tolist()
    half = case["seq"] // 2
    split = Split("train", [], [Encoded(row, [IGNORE] * half + row[half:]) for row in rows])
    loss_module = StepLoss(model, offloaded(label_loss_sum, case.get("offload", False) and device.type == "cuda"))
    model.train()

    def step() -> None:
        # accumulation: the same rows again, the earlier micro-batches' gradients held meanwhile
        train_step(loss_module, split, [list(range(case["batch"]))] * case["accum"], 0, layout=layout)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(case: dict, folder: Path) -> dict:
    from tunesmith.plan import TrainingMemory

    device = device_here()
    memory = TrainingMemory(device)  # on the CPU: resident memory from before the model loads
    step = training(case, folder, device)
    for number in range(3):
        step()
        if number == 0:
            memory.start()  # from here the optimizer states exist
    return {"measured": memory.peak()}


def predict(case: dict, folder: Path) -> float:
    import torch

    from tunesmith.plan import estimate, estimate_for_machine
    from tunesmith.plan.setup import Setup
    from tunesmith.plan.shapes import model_shape
    from tunesmith.training.loss import head_chunk

    shape = model_shape(str(folder))
    setup = Setup(method=case["method"], dtype="bfloat16", batch=case["batch"], seq=case["seq"],
                  gradient_checkpointing=bool(case["ckpt"]), r=32, label_share=0.5,
                  checkpoint_layers=None if case["ckpt"] is True else case["ckpt"] or None,
                  tokens=case["batch"] * case["seq"], head_chunk=head_chunk(shape.vocab, "cuda"),
                  grad_accum=case["accum"], adapter_dtype=case.get("adapters", "float32"),
                  offload_activations=case.get("offload", False) and torch.cuda.is_available())
    if torch.cuda.is_available():
        return estimate(shape, setup).total  # tensors only: allocated memory has no context or slack
    return estimate_for_machine(shape, setup).total


def build(shape: str, folder: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_compare import build_model

    build_model(shape, folder)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--folder")
    parser.add_argument("--models", default=None, help="built models, MODELS/SHAPE (bench/gpu_compare.py --models)")
    args = parser.parse_args()
    if args.child:
        case = json.loads(args.child)
        print(json.dumps({**measure(case, Path(args.folder)), "predicted": predict(case, Path(args.folder))}))
        return
    cases = QUICK if args.quick else CASES
    print(f"{'shape':<14}{'method':<20}{'batch x seq':>12}{'accum':>6}{'ckpt':>6}{'measured':>11}{'plan':>10}{'error':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        folders: dict[str, Path] = {}
        for case in cases:
            if case["shape"] not in folders:
                folders[case["shape"]] = Path(args.models or tmp) / case["shape"]
                build(case["shape"], folders[case["shape"]])
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(case),
                                   "--folder", str(folders[case["shape"]])], capture_output=True, text=True)
            method = case["method"] + ("+bf16" if case.get("adapters") == "bfloat16" else "") + (
                "+offload" if case.get("offload") else "")
            label = (f"{case['shape']:<14}{method:<20}{case['batch']:>5} x {case['seq']:<5}{case['accum']:>6}"
                     f"{str(case['ckpt']):>6}")
            if done.returncode != 0:
                print(f"{label} failed:\n    " + "\n    ".join(done.stderr.strip().splitlines()[-25:]), flush=True)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            error = row["predicted"] / row["measured"] - 1
            print(f"{label}{row['measured'] / 2**30:>9.2f} G{row['predicted'] / 2**30:>8.2f} G{error:>+8.0%}", flush=True)


if __name__ == "__main__":
    main()
