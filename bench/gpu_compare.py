"""tunesmith against TRL's SFTTrainer + peft on the same GPU: tokens/s, peak memory, MFU, and the
plan's prediction against what was allocated.

The setup Unsloth publishes its "2x faster, 70% less memory" claim on: the Llama-3.1-8B shape,
QLoRA r=32 on every linear layer, micro-batch 2 x accumulation 4, rows of 2048 tokens; and the
same with LoRA on a bf16 base. TRL stores a QLoRA run's adapters (and so their gradients and AdamW
states) in bf16, so the QLoRA rows compare 'qlora:bf16' (tunesmith with adapter.dtype=bfloat16); its
default, fp32 adapters, is 'qlora'. Weights are random, built from the shape's config (no hub is
reachable where this runs; speed and memory do not depend on weight values), the tokenizer is the
small BPE tokenizer the tests build (trained here in seconds; its ids fit any vocabulary), the data rows are 2048 tokens of MedQuAD
text (or repeated generated text where MedQuAD is absent). Each run trains in a fresh process.

    python bench/gpu_compare.py --shape llama-3.1-8b --methods qlora:bf16,lora,lora:nockpt --steps 5 --warmup 2
    python bench/gpu_compare.py --methods qlora,qlora:bf16 --trl-methods qlora,qlora:bf16   # fp32 adapters too
    python bench/gpu_compare.py --shape tiny --steps 3 --warmup 1   # the flow, on the CPU, in a minute

Prints one table and writes --out (JSON). Run only on a machine doing nothing else.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"
TINY = dict(vocab_size=600, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def build_model(shape: str, folder: Path) -> None:
    """A random model of the shape (bf16) with the tests' tokenizer, saved to `folder`; a model
    already there is kept (the comparison, the plan and the profile share one, `--models`)."""
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.plan.shapes import ALIASES, KNOWN

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import build_tokenizer

    fields = TINY if shape == "tiny" else KNOWN[ALIASES.get(shape, shape)]
    config = LlamaConfig(**fields, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=1, eos_token_id=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer(folder)


def write_rows(folder: Path, tokenizer_dir: Path, rows: int, length: int) -> dict:
    """`rows` documents of at least `length` tokens: tunesmith's text format and TRL's input_ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = []
    for path in sorted(MEDQUAD.glob("*.jsonl")):
        texts += [json.loads(line).get("answer", "") for line in open(path)]
        if len(texts) > 20000:
            break
    if not texts:
        texts = [f"Sentence {i} of a long generated document about fine-tuning." for i in range(20000)]
    ids, documents = [], []
    text = ""
    for chunk in texts:
        text += chunk + "\n"
        if len(text) > 6 * length:
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) >= length:
                ids.append(encoded[:length])
                documents.append(tokenizer.decode(encoded[:length - 1]))
                text = ""
        if len(ids) == rows:
            break
    with open(folder / "text.jsonl", "w") as out:
        for document in documents:
            out.write(json.dumps({"text": document}) + "\n")
    with open(folder / "validation.jsonl", "w") as out:  # eval loss before and after, kept short
        for document in documents[:4]:
            out.write(json.dumps({"text": document}) + "\n")
    with open(folder / "ids.jsonl", "w") as out:
        for row in ids:
            out.write(json.dumps({"input_ids": row}) + "\n")
    return {"text": str(folder / "text.jsonl"), "ids": str(folder / "ids.jsonl"),
            "validation": str(folder / "validation.jsonl")}


def base_method(spec: str) -> str:
    """'qlora:bf16' -> 'qlora': a method, optionally with ':nockpt' (no gradient checkpointing),
    ':bf16' (adapters, their gradients and AdamW states in bf16, as TRL's QLoRA keeps them),
    ':offload' (tunesmith only: the checkpointed activations in host memory) and ':plain'
    (tunesmith only: train.fast_paths off, plain transformers + peft: is a fast path what costs
    QLoRA its speed? On 2026-12-04 tunesmith's QLoRA ran at 0.75x its LoRA, TRL's at 1.02x)."""
    return spec.split(":")[0]


def checkpointing(spec: str) -> bool:
    """Both stacks recompute activations unless the method says ':nockpt' (an H200 holds the 8B LoRA
    run without it, and the MFU target is about the arithmetic, not a recompute)."""
    return "nockpt" not in spec.split(":")[1:]


def adapter_dtype(spec: str) -> str:
    return "bfloat16" if "bf16" in spec.split(":")[1:] else "float32"


def fast_paths(spec: str) -> str:
    return "off" if "plain" in spec.split(":")[1:] else "auto"


def offloading(spec: str) -> bool:
    """':offload': tunesmith's adapter.offload_activations (checkpointed inputs in host memory)."""
    return "offload" in spec.split(":")[1:]


def train_tunesmith(args) -> dict:
    import torch

    import tunesmith
    from tunesmith.accel.cuda.attention import kernel_name

    config = {
        "model": {"name": args.model, "dtype": "bfloat16"},
        "data": {"train": args.data["text"], "validation": args.data["validation"], "format": "text",
                 "max_seq_len": args.length, "cache": False},
        "adapter": {"method": base_method(args.method), "r": 32, "alpha": 64, "target_modules": "all-linear",
                    "gradient_checkpointing": checkpointing(args.method),  # as TRL's run below
                    "dtype": adapter_dtype(args.method), "offload_activations": offloading(args.method)},
        "train": {"max_steps": args.steps, "batch_size": args.batch, "grad_accum": args.accum, "lr": 2e-4,
                  "log_every": 1, "warmup_ratio": 0.0, "fast_paths": fast_paths(args.method)},
        "eval": {"generate": False, "report": False, "compare_base": False, "batch_size": 1},
        "output": {"dir": str(args.out), "overwrite": True},
    }
    profile = profile_last_step(args, config)
    results = tunesmith.train(config)
    records = [json.loads(line) for line in open(Path(args.out) / "metrics.jsonl")]
    steps = [r for r in records if r.get("event") == "train"][args.warmup:]
    if profile is not None:
        steps = steps[:-1]  # the profiled step is slower: not timed
    seconds = sum((r["tokens"] - p["tokens"]) / r["tokens_per_second"] for p, r in zip(steps, steps[1:]))
    tokens = steps[-1]["tokens"] - steps[0]["tokens"]
    device = torch.device(results["device"])
    # MFU is linear in tokens/s: the measured steps' speed, not the whole run's (which includes
    # the compiling first steps: the 2026-12-04 table's 15% and 30% were whole-run figures).
    last = steps[-1]
    mfu = last["mfu"] * (tokens / seconds) / last["tokens_per_second"] if last.get("mfu") else None
    return {"tokens_per_second": tokens / seconds, "peak_allocated": results["peak_memory"]["measured"],
            "planned": results["peak_memory"]["predicted"], "mfu": mfu, "whole_run_mfu": results.get("mfu"),
            "fast_paths": results.get("fast_paths"), "layout": results.get("batch_layout"),
            "attention_kernel": kernel_name(device, getattr(torch, results["dtype"])) if device.type == "cuda" else None,
            "profile": profile[0] if profile else None}


def profile_last_step(args, config: dict) -> list | None:
    """Where the time of one more step goes, for --profile's methods: the run gets a step after the
    timed ones, and its forward and backward passes (training/step.py train_step) run under
    torch.profiler. Returns the list that holds the profile's text once the run has ended."""
    if args.method not in args.profile.split(","):
        return None
    from gpu_profile import profiled
    from tunesmith.training import loop

    config["train"]["max_steps"] += 1
    real, calls, text = loop.train_step, [0], []

    def train_step(loss_module, *rest):
        calls[0] += 1
        if calls[0] < config["train"]["max_steps"]:
            return real(loss_module, *rest)
        done = []
        try:
            with profiled(next(loss_module.parameters()).device) as found:
                done.append(real(loss_module, *rest))
        except Exception as err:  # noqa: BLE001 (the profile is extra: a profiler that fails must not end the run)
            text.append(f"no profile ({type(err).__name__}: {err})")
            return done[0] if done else real(loss_module, *rest)
        text.extend(found)
        return done[0]

    loop.train_step = train_step
    return text


def train_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Clock(TrainerCallback):
        def __init__(self):
            self.points: list[tuple[float, int]] = []

        def on_train_begin(self, train_args, state, control, **kwargs):
            # the peak of training, as tunesmith's is: loading and quantizing the weights left out
            torch.cuda.reset_peak_memory_stats() if torch.cuda.is_available() else None

        def on_step_end(self, train_args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.points.append((time.perf_counter(), state.num_input_tokens_seen))

    init = {"dtype": torch.bfloat16}
    if base_method(args.method) == "qlora":  # TRL's and peft's documented QLoRA set-up
        init["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_use_double_quant=True,
                                                         bnb_4bit_compute_dtype=torch.bfloat16)
    config = SFTConfig(output_dir=str(args.out), per_device_train_batch_size=args.batch,
                       gradient_accumulation_steps=args.accum, learning_rate=2e-4, max_steps=args.steps,
                       max_length=args.length, bf16=True, logging_steps=1, save_strategy="no", report_to="none",
                       gradient_checkpointing=checkpointing(args.method), model_init_kwargs=init, include_num_input_tokens_seen="all",
                       use_cpu=not torch.cuda.is_available(), dataset_kwargs={"skip_prepare_dataset": False})
    clock = Clock()
    trainer = SFTTrainer(model=args.model, args=config, callbacks=[clock],
                         train_dataset=load_dataset("json", data_files=args.data["ids"], split="train"),
                         peft_config=LoraConfig(r=32, lora_alpha=64, target_modules="all-linear", task_type="CAUSAL_LM"))
    # TRL stores a QLoRA run's adapters in bf16 and peft a LoRA run's in fp32: each as the method asks
    # (the optimizer, made in train(), takes them as they are then)
    for param in trainer.model.parameters():
        if param.requires_grad:
            param.data = param.data.to(getattr(torch, adapter_dtype(args.method)))
    trainer.train()
    (t0, n0), (t1, n1) = clock.points[args.warmup], clock.points[-1]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return {"tokens_per_second": (n1 - n0) / (t1 - t0), "peak_allocated": peak}


def child(args) -> None:
    args.data = json.loads(args.data)
    result = train_tunesmith(args) if args.stack == "tunesmith" else train_trl(args)
    Path(args.result).write_text(json.dumps(result))


def spawn(args, stack: str, method: str, model: str, data: dict, tmp: Path) -> dict:
    result = tmp / f"{stack}-{method}.json"
    command = [sys.executable, __file__, "--child", "--stack", stack, "--method", method, "--model", model,
               "--data", json.dumps(data), "--result", str(result), "--out", str(tmp / f"run-{stack}-{method}"),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
               "--accum", str(args.accum), "--length", str(args.length), "--profile", args.profile]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed",
                "log": done.stderr[-6000:]}
    return {**json.loads(result.read_text()), "wall_seconds": round(time.perf_counter() - start, 1)}


def show(method: str, stack: str, r: dict) -> None:
    """One row of the table, printed as soon as its run ends (a run cut short keeps the rows before)."""
    if "error" in r:
        print(f"{method:<19}{stack:<11} failed: {r['error']}\n    " + "\n    ".join(r["log"].splitlines()[-25:]))
    else:
        gib = (lambda v: f"{v / 2**30:.2f}" if v else "-")
        mfu = f"{r['mfu']:.0%}" if r.get("mfu") else "-"
        print(f"{method:<19}{stack:<11}{r['tokens_per_second']:>10.0f}{gib(r.get('peak_allocated')):>10}"
              f"{gib(r.get('planned')):>10}{mfu:>7}{r['wall_seconds']:>8.0f}")
        if r.get("fast_paths") is not None:
            kernel = f", CUDA attention kernel {r['attention_kernel']}" if r.get("attention_kernel") else ""
            print(f"    fast paths {r['fast_paths']}, {r['layout']} batches{kernel}")
        if r.get("profile"):
            print("    one more step, profiled (its forward and backward passes): " +
                  r["profile"].replace("\n", "\n    "))
    sys.stdout.flush()


def compared(row: dict) -> str | None:
    """tunesmith's tokens/s and peak memory as multiples of TRL's, where both ran."""
    ours, theirs = row.get("tunesmith", {}), row.get("trl", {})
    if "tokens_per_second" not in ours or "tokens_per_second" not in theirs:
        return None
    text = f"  {row['method']}: tunesmith {ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x TRL's tokens/s"
    if ours.get("peak_allocated") and theirs.get("peak_allocated"):
        text += f", {ours['peak_allocated'] / theirs['peak_allocated']:.2f}x its peak memory"
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--methods", default="qlora:bf16,lora,lora:nockpt",
                        help="qlora:bf16 is TRL's QLoRA set-up (bf16 adapters); qlora, tunesmith's default (fp32)")
    parser.add_argument("--stacks", default="tunesmith,trl")
    parser.add_argument("--trl-methods", default="qlora:bf16,lora",
                        help="the methods TRL runs too (lora:nockpt, for the MFU target, is tunesmith's alone by "
                             "default: the GPU check's minutes)")
    parser.add_argument("--profile", default="qlora:bf16,lora",
                        help="tunesmith's methods that run one more step, profiled (none: '')")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--accum", type=int, default=4)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=None, help="keep the built model in MODELS/SHAPE (reused if there)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--stack"), parser.add_argument("--method"), parser.add_argument("--model")
    parser.add_argument("--data"), parser.add_argument("--result")
    args = parser.parse_args()
    if args.child:
        return child(args)
    rows = args.batch * args.accum * (args.steps + 1)
    table = []
    print(f"{args.shape}, r=32 all linear, micro-batch {args.batch} x accumulation {args.accum}, "
          f"{args.length} tokens, {args.steps} steps ({args.warmup} warm-up); gradient checkpointing in both stacks "
          "except ':nockpt'")
    print(f"{'method':<19}{'stack':<11}{'tokens/s':>10}{'peak GiB':>10}{'plan GiB':>10}{'MFU':>7}{'wall s':>8}", flush=True)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        model = Path(args.models) / args.shape if args.models else tmp / "model"
        build_model(args.shape, model)
        data = write_rows(tmp, model, rows, args.length)
        # The 16 GB just written would still be flushing to disk during the first timed run (on
        # 2026-12-04 that was tunesmith's QLoRA, 25% slower than its LoRA while TRL's was not).
        os.sync()
        for method in args.methods.split(","):
            row = {"method": method}
            table.append(row)
            for stack in args.stacks.split(","):
                if stack == "trl" and method not in args.trl_methods.split(","):
                    continue
                row[stack] = spawn(args, stack, method, str(model), data, tmp)
                show(method, stack, row[stack])
                if args.out:
                    Path(args.out).write_text(json.dumps({"shape": args.shape, "rows": table}, indent=1))
            ratios = compared(row)
            if ratios:
                print(ratios, flush=True)


if __name__ == "__main__":
    main()
