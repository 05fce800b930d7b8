"""Full fine-tuning, LoRA, DoRA and QLoRA side by side on the default model and MedQuAD samples.

Same data, sequence length, batch, rank, steps and dtype for every method; each method trains in
a fresh process through tunesmith's own path (tunesmith.train), so peak resident memory is that
method's alone. Reported: model memory as loaded, peak resident memory of the process (imports
included), training tokens/s (non-padding tokens, the first logging window left out as
warm-up), and the eval loss on held-out MedQuAD answers before and after.

    .venv/bin/python bench/methods.py                 # about 5 minutes on an idle 2-core CPU
    .venv/bin/python bench/methods.py --steps 3       # quicker, noisier
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"
COLLECTIONS = ["3_GHR_QA", "5_NIDDK_QA", "6_NINDS_QA"]
METHODS = {"full": 2e-5, "lora": 2e-4, "dora": 2e-4, "qlora": 2e-4}  # method -> learning rate


def write_data(folder: Path, n_train: int, n_validation: int, seed: int = 0) -> dict[str, str]:
    """Seeded question/answer samples with short answers (they fit max_seq_len 256)."""
    pool = []
    for name in COLLECTIONS:
        with open(MEDQUAD / f"{name}.jsonl", encoding="utf-8") as handle:
            pool += [{"question": r["question"], "answer": r["answer"]} for r in map(json.loads, handle)
                     if 100 <= len(r["answer"]) <= 600]
    random.Random(seed).shuffle(pool)
    paths = {}
    for split, rows in (("train", pool[:n_train]), ("validation", pool[n_train:n_train + n_validation])):
        paths[split] = str(folder / f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in rows)
    return paths


def steady_tokens_per_second(metrics: Path) -> float:
    """Tokens/s over the logging windows after the first (which holds warm-up)."""
    records = [r for r in map(json.loads, open(metrics)) if r.get("event") == "train"]
    tokens = seconds = 0.0
    for before, record in zip(records, records[1:]):
        window = record["tokens"] - before["tokens"]
        tokens += window
        seconds += window / record["tokens_per_second"]
    return tokens / seconds if seconds else float("nan")


def child(args) -> None:
    """One method, in this fresh process; prints one JSON line."""
    import tunesmith

    config = {
        "model": {"name": "default", "dtype": args.dtype},
        "data": {"train": args.train, "validation": args.validation, "max_seq_len": 256},
        "adapter": {"method": args.method, "r": 16, "alpha": 32},
        "train": {"max_steps": args.steps, "batch_size": 4, "lr": METHODS[args.method], "log_every": 2,
                  "warmup_ratio": 0.0},
        "eval": {"generate": False, "report": False, "batch_size": 8},
        "output": {"dir": args.out, "overwrite": True},
    }
    results = tunesmith.train(config)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({
        "method": args.method, "model_bytes": results["model_bytes"], "peak_rss": peak,
        "trainable": results["trainable_parameters"], "total": results["total_parameters"],
        "tokens_per_second": steady_tokens_per_second(Path(args.out) / "metrics.jsonl"),
        "base_eval_loss": results["base"]["eval_loss"], "eval_loss": results["fine_tuned"]["eval_loss"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where the CPU/GPU runs it fast, else fp32) or float32")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("method", "train", "validation", "out"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if not MEDQUAD.is_dir():
        sys.exit(f"{MEDQUAD}: MedQuAD not found")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp), n_train=64, n_validation=16)
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--child", "--method", method, "--steps", str(args.steps),
                   "--dtype", args.dtype, "--train", data["train"], "--validation", data["validation"],
                   "--out", str(Path(tmp) / f"run-{method}")]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{method} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{method}: done", file=sys.stderr, flush=True)
    print(f"\nSmolLM2-135M-Instruct, MedQuAD (64 train / 16 validation), {args.steps} steps x batch 4, "
          f"max_seq_len 256, r=16, dtype {args.dtype}\n")
    print("| method | trainable | model memory | peak RSS | tokens/s | eval loss (base -> tuned) |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['method']} | {r['trainable'] / 1e6:.2f}M of {r['total'] / 1e6:.1f}M "
              f"| {r['model_bytes'] / 2**20:.0f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | {r['tokens_per_second']:.0f} "
              f"| {r['base_eval_loss']:.3f} -> {r['eval_loss']:.3f} |")


if __name__ == "__main__":
    main()
