"""Training speed, memory and quality: tunesmith against TRL's SFTTrainer + peft, side by side.

The default model (SmolLM2-135M-Instruct), the same MedQuAD question/answer examples (each at
most 512 tokens), LoRA r=16 / alpha 32 on all linear layers, per-device batch, gradient
accumulation, peak learning rate (cosine decay, no warm-up) and one epoch for every run. Each run
trains in a fresh process, one after the other:

  tunesmith      its defaults (bf16 where fast, random steps cut into little-padding micro-batches,
                 label-only LM head with its gradient in the forward, compiled RMSNorm/SwiGLU)
  trl-defaults   SFTConfig as TRL 1.16 ships it: bf16 autocast over fp32 weights, gradient checkpointing
  trl-fp32       the same with bf16=False: fp32, no speed option at all
  trl-best       bf16 weights and autocast, no gradient checkpointing, packing (best-fit, padding-free)

Every run trains once per seed (--seeds; trl-fp32, the slowest and outside the acceptance bar,
once): a 12-step run's eval loss moves by about 1% with the seed alone (LoRA init and data
order; TRL at its defaults gave 2.332, 2.357 and 2.358 for seeds 0-2), so one seed cannot show a
1% difference. Printed per run: non-padding tokens/s after the warm-up steps (mean over seeds),
peak resident memory of the process (highest over seeds), eval loss of the saved adapters on
held-out examples (the same code for every run: tunesmith's eval_loss, mean over answer tokens,
fp32; mean over seeds), model FLOPs utilisation against the 2048x2048 matmul peak measured in
the same invocation (before and after the runs, the higher), and the ratios to tunesmith.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_speed.py                  # all runs
    OMP_NUM_THREADS=2 .venv/bin/python bench/train_speed.py --runs tunesmith,trl-best --train-examples 64

Time it only on a quiet machine (1-minute load average well below the core count): with other
jobs on the cores, 2 OpenMP threads wait on each other and every figure collapses.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"
RUNS = ("tunesmith", "trl-best", "trl-defaults", "trl-fp32")
LORA = {"r": 16, "alpha": 32}
MAX_LEN = 512
# TRL renders the chat template itself; a margin keeps every example under MAX_LEN in both stacks.
SELECT_LEN = MAX_LEN - 16


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def steady_rate(points: list[tuple[float, int]], warmup: int) -> float:
    """Tokens/s between the end of step `warmup` and the last step; points are (seconds, tokens) cumulative."""
    if len(points) <= warmup + 1:
        raise SystemExit(f"only {len(points)} steps: too few to leave {warmup} warm-up steps out")
    (t0, n0), (t1, n1) = points[warmup], points[-1]
    return (n1 - n0) / (t1 - t0)


def write_data(folder: Path, n_train: int, n_eval: int, seed: int) -> dict:
    """Seeded MedQuAD question/answer examples whose tokenised length fits, as tunesmith and TRL read them."""
    from tunesmith.data.tokenize import encode_many
    from tunesmith.models import load_tokenizer

    pool = []
    for path in sorted(MEDQUAD.glob("*.jsonl")):
        with open(path, encoding="utf-8") as handle:
            pool += [{"question": r["question"].strip(), "answer": r["answer"].strip()} for r in map(json.loads, handle)
                     if r.get("question") and r.get("answer")]
    random.Random(seed).shuffle(pool)
    tokenizer = load_tokenizer("default")
    chosen, lengths, labels = [], [], []
    for start in range(0, len(pool), 512):
        batch = pool[start:start + 512]
        conversations = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
                         for r in batch]
        for record, result in zip(batch, encode_many(tokenizer, conversations)):
            encoded = result if isinstance(result, Exception) else result[-1]  # one answer: one example
            if not isinstance(encoded, Exception) and len(encoded.input_ids) <= SELECT_LEN:
                chosen.append(record)
                lengths.append(len(encoded.input_ids))
                labels.append(encoded.label_count)
        if len(chosen) >= n_train + n_eval:
            break
    splits = {"train": chosen[:n_train], "validation": chosen[n_train:n_train + n_eval]}
    paths = {}
    for name, rows in splits.items():
        paths[name] = str(folder / f"{name}.jsonl")
        with open(paths[name], "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in rows)
    paths["trl_train"] = str(folder / "trl_train.jsonl")
    with open(paths["trl_train"], "w", encoding="utf-8") as out:  # TRL's conversational prompt-completion format
        for r in splits["train"]:
            out.write(json.dumps({"prompt": [{"role": "user", "content": r["question"]}],
                                  "completion": [{"role": "assistant", "content": r["answer"]}]}) + "\n")
    paths["lengths"], paths["label_counts"] = lengths[:n_train], labels[:n_train]
    return paths


def cpu_identity() -> str:
    """The processor this run had: the machines this bench runs on are virtual and not all alike
    (the bf16 matmul peak of two cores has read 420, 800 and 2000 GFLOP/s on different sessions'
    hosts), so every table says which one it came from."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        return "unknown processor"
    flags = set(info.get("flags", "").split())
    bf16 = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')}, model {info.get('model', '?')}), "
            f"bf16 matmul instructions: {', '.join(bf16) or 'none'}")


def matmul_peak(size: int = 2048, seconds: float = 2.0) -> dict:
    """Best GFLOP/s of a size x size matmul in fp32 and bf16, with the threads this process has,
    and of the default model's widest matmul in bf16 at a full micro-batch ([2048, 576] x
    [576, 1536], "model_shape": what its linear layers can reach here; on AMX hosts well below
    the square's).

    Each first runs for `seconds` untimed: on AMX hosts the first bf16 matmuls of a process run at
    a third of the speed reached after a second or so, and a best-of-10 taken cold under-states
    the peak (and over-states every MFU) by that much. Then the best of `seconds` of timed runs."""
    import torch

    shapes = {"float32": (torch.float32, (size, size, size)), "bfloat16": (torch.bfloat16, (size, size, size)),
              "model_shape": (torch.bfloat16, (2048, 576, 1536))}
    out = {}
    for name, (dtype, (m, k, n)) in shapes.items():
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for timed in (False, True):
            best, until = float("inf"), time.perf_counter() + seconds
            while time.perf_counter() < until:
                start = time.perf_counter()
                torch.mm(a, b)
                best = min(best, time.perf_counter() - start)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def train_tunesmith(args) -> dict:
    import tunesmith

    config = {
        "model": {"name": "default", "dtype": "auto"},
        "data": {"train": args.data["train"], "validation": args.data["validation"], "max_seq_len": MAX_LEN},
        "adapter": {"method": "lora", **LORA, "target_modules": "all-linear"},
        "train": {"epochs": 1, "batch_size": args.batch, "grad_accum": args.accum, "lr": args.lr,
                  "warmup_ratio": 0.0, "min_lr_ratio": 0.0, "log_every": 1, "seed": args.seed},
        "eval": {"generate": False, "report": False},
        "output": {"dir": str(args.out), "overwrite": True},
    }
    results = tunesmith.train(config)
    points, seconds = [], 0.0
    for record in map(json.loads, open(args.out / "metrics.jsonl")):
        if record.get("event") == "train":  # log_every 1: one record per step, tokens cumulative
            window = record["tokens"] - (points[-1][1] if points else 0)
            seconds += window / record["tokens_per_second"]
            points.append((seconds, record["tokens"]))
    return {"tokens_per_second": steady_rate(points, args.warmup), "steps": len(points), "tokens": points[-1][1],
            "adapter": str(args.out), "dtype": results["dtype"]}


def train_trl(args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunesmith.models.default import default_model_dir

    class StepClock(TrainerCallback):
        def __init__(self):
            self.points: list[tuple[float, int]] = []

        def on_step_end(self, train_args, state, control, **kwargs):
            self.points.append((time.perf_counter(), state.num_input_tokens_seen))

    best = args.run == "trl-best"
    settings = {"bf16": False} if args.run == "trl-fp32" else {}
    if best:  # bf16 weights as well as autocast, no recomputation, and packing (padding-free rows)
        settings = {"bf16": True, "gradient_checkpointing": False, "packing": True,
                    "model_init_kwargs": {"dtype": "bfloat16"}}
    config = SFTConfig(
        output_dir=str(args.out), per_device_train_batch_size=args.batch, gradient_accumulation_steps=args.accum,
        learning_rate=args.lr, lr_scheduler_type="cosine", num_train_epochs=1, max_length=MAX_LEN, seed=args.seed,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available(),
        # Padding-free batches have no attention mask and no padding: every token counts.
        include_num_input_tokens_seen="all" if best else "non_padding", **settings)
    clock = StepClock()
    trainer = SFTTrainer(
        model=str(default_model_dir()), args=config, train_dataset=load_dataset("json", data_files=args.data["trl_train"],
                                                                                  split="train"),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                               task_type="CAUSAL_LM"),
        callbacks=[clock])
    trainer.train()
    trainer.save_model(str(args.out))
    start = clock.points[0][0]
    points = [(t - start, n) for t, n in clock.points]
    return {"tokens_per_second": steady_rate(points, args.warmup), "steps": len(points), "tokens": points[-1][1],
            "adapter": str(args.out), "dtype": "bfloat16" if best else ("float32" if args.run == "trl-fp32" else
                                                                       "float32+bf16 autocast"),
            "threads": torch.get_num_threads()}


def evaluate(args) -> dict:
    """Eval loss of every adapter on the held-out split, in fp32, with the one loss definition."""
    import torch

    from tunesmith.config import DataConfig
    from tunesmith.data.prepare import prepare
    from tunesmith.runs import load_trained
    from tunesmith.eval.loss import eval_loss

    losses = {}
    for name, folder in args.adapters.items():
        model, tokenizer, _ = load_trained(folder, dtype=torch.float32)
        split = prepare(DataConfig(train=args.data["validation"], validation=args.data["validation"], cache=False),
                        tokenizer).splits["validation"]
        losses[name] = eval_loss(model, split, 8, tokenizer.pad_token_id)
    return losses


def child(args) -> None:
    args.data = json.loads(Path(args.data_file).read_text())
    args.out = Path(args.out)
    if args.run == "peak":
        result = matmul_peak()
    elif args.run == "eval":
        args.adapters = json.loads(args.adapters)
        result = evaluate(args)
    elif args.run == "tunesmith":
        result = train_tunesmith(args)
    else:
        result = train_trl(args)
    result["peak_rss"] = peak_rss()
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, run: str, tmp: Path, out: str, seed: str = "0", **extra) -> dict:
    """Runs `run` in a fresh process (its own peak memory), writing under tmp/out."""
    cmd = [sys.executable, __file__, "--child", run, "--data-file", str(tmp / "data.json"), "--out", str(tmp / out),
           "--batch", str(args.batch), "--accum", str(args.accum), "--lr", str(args.lr), "--seed", seed,
           "--warmup", str(args.warmup)]
    for key, value in extra.items():
        cmd += [f"--{key}", value]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{out} failed:\n{done.stderr[-4000:]}")
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    print(f"{out}: {time.perf_counter() - started:.0f} s {line[len('RESULT '):]}", file=sys.stderr, flush=True)
    return json.loads(line[len("RESULT "):])


def flops_per_token(lengths: list[int], label_counts: list[int], head_on_every_token: bool) -> float:
    """Model FLOPs per trained token for LoRA, averaged over the training examples.

    Frozen linear layers: forward 2N + input gradient 2N = 4N (N = the 106M non-embedding weights).
    LoRA A and B: forward, input and weight gradients, 6 per weight. Attention (QK^T and AV, the
    causal half actually needed): 2 * 2 * d * T^2 / 2 forward per layer and example, x3 with the
    backward. LM head (tied to the frozen embedding): 4 * vocab * d per position that goes through
    it: tunesmith only the label positions, TRL every position.
    """
    from transformers import AutoConfig

    from tunesmith.models.default import default_model_dir

    c = AutoConfig.from_pretrained(default_model_dir())
    d, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = d * c.num_key_value_heads // c.num_attention_heads
    linear = layers * (2 * d * d + 2 * d * kv + 3 * d * inter)
    lora = layers * LORA["r"] * (2 * (d + d) + 2 * (d + kv) + 2 * (d + inter) + (inter + d))
    tokens = sum(lengths)
    total = (4 * linear + 6 * lora) * tokens
    total += sum(3 * 2 * d * t * t for t in lengths) * layers
    total += 4 * vocab * d * (tokens if head_on_every_token else sum(label_counts))
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--train-examples", type=int, default=96)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds (LoRA init, data order) per run; "
                        "trl-fp32 runs the first only")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of tokens/s")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    for name in ("data-file", "out", "adapters"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.run = args.child
        return child(args)
    if not MEDQUAD.is_dir():
        sys.exit(f"{MEDQUAD}: MedQuAD not found")
    runs = args.runs.split(",")
    seeds = [int(x) for x in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data = write_data(tmp, args.train_examples, args.eval_examples, 0)  # one data set for every seed
        (tmp / "data.json").write_text(json.dumps(data))
        before = spawn(args, "peak", tmp, "peak")
        trained = {run: [spawn(args, run, tmp, f"{run}-s{seed}", seed=str(seed))
                         for seed in (seeds[:1] if run == "trl-fp32" else seeds)] for run in runs}
        after = spawn(args, "peak", tmp, "peak-after")
        # The higher of the two: the machine's speed drifts (shared cores), and a higher peak gives the lower MFU.
        peak = {name: max(before[name], after[name]) for name in ("float32", "bfloat16", "model_shape")}
        folders = {f"{run}-{n}": r["adapter"] for run, results in trained.items() for n, r in enumerate(results)}
        losses = spawn(args, "eval", tmp, "eval", adapters=json.dumps(folders))
    rows = {run: summarise(results, [losses[f"{run}-{n}"] for n in range(len(results))])
            for run, results in trained.items()}
    print_table(args, data, peak, rows)


def summarise(results: list[dict], losses: list[float]) -> dict:
    """One row per stack: tokens/s averaged over its seeds, the highest peak, eval losses of every seed."""
    return {**results[0], "tokens_per_second": sum(r["tokens_per_second"] for r in results) / len(results),
            "peak_rss": max(r["peak_rss"] for r in results), "losses": losses, "loss": sum(losses) / len(losses)}


def print_table(args, data, peak, rows) -> None:
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"\nSmolLM2-135M-Instruct, LoRA r=16 all-linear, MedQuAD {args.train_examples} train / {args.eval_examples} "
          f"held-out examples (<= {SELECT_LEN} tokens, {sum(data['lengths'])} train tokens), batch {args.batch} x "
          f"accumulation {args.accum}, lr {args.lr}, 1 epoch, max length {MAX_LEN}; seeds {args.seeds}; "
          f"OMP_NUM_THREADS={threads}, load average {os.getloadavg()[0]:.1f}")
    print(f"processor: {cpu_identity()}")
    print(f"matmul peak 2048x2048 (higher of before and after the runs): fp32 {peak['float32']:.0f} GFLOP/s, "
          f"bf16 {peak['bfloat16']:.0f} GFLOP/s; the model's [2048, 576] x [576, 1536] bf16: "
          f"{peak['model_shape']:.0f} GFLOP/s\n")
    base = rows.get("tunesmith")
    print("| run | dtype | seeds | steps | tokens/s | peak RSS | eval loss (mean) | MFU (peak of its dtype) | tunesmith tokens/s "
          "ratio | tunesmith RSS ratio | tunesmith eval loss vs this |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run, r in rows.items():
        per_token = flops_per_token(data["lengths"], data["label_counts"], head_on_every_token=run != "tunesmith")
        # Against the peak of the dtype it trained in (fp32 where the processor has no fast bf16).
        mfu = r["tokens_per_second"] * per_token / (peak["float32" if r["dtype"] == "float32" else "bfloat16"] * 1e9)
        speed = f"{base['tokens_per_second'] / r['tokens_per_second']:.2f}x" if base else "-"
        memory = f"{base['peak_rss'] / r['peak_rss']:.2f}x" if base else "-"
        quality = f"{100 * (base['loss'] / r['loss'] - 1):+.2f}%" if base else "-"
        print(f"| {run} | {r['dtype']} | {len(r['losses'])} | {r['steps']} | {r['tokens_per_second']:.0f} "
              f"| {r['peak_rss'] / 2**20:.0f} MiB | {r['loss']:.4f} | {100 * mfu:.1f}% | {speed} | {memory} | {quality} |")
    print("\neval loss per seed: " + "; ".join(f"{run} " + ", ".join(f"{x:.4f}" for x in r["losses"])
                                             for run, r in rows.items()))


if __name__ == "__main__":
    main()
