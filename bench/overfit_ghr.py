"""How long to train before it overfits, and how long an epoch takes against the plan.

120 MedQuAD GHR questions (answers under 700 characters; 30 for validation, 20 for test),
LoRA on the default model at lr 1e-3 for up to 8 epochs, the eval loss every 5 steps and
`eval.patience: 3`. Prints the evaluations, where training stopped and which weights it kept,
and `tunesmith plan`'s epoch time on this machine against the run's (its tokens over its mean
tokens/s). Time it on a quiet machine.

    .venv/bin/python bench/overfit_ghr.py runs/overfit-ghr
    .venv/bin/python bench/overfit_ghr.py runs/overfit-ghr-rouge eval.best_metric=rouge_l eval.best_metric_examples=30
"""
from __future__ import annotations

import json
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad" / "3_GHR_QA.jsonl"
CONFIG = """data:
  train: train.jsonl
  validation: validation.jsonl
  test: test.jsonl
  max_seq_len: 256
train:
  epochs: 8
  batch_size: 8
  lr: 1.0e-3
  log_every: 5
eval:
  every_steps: 5
  patience: 3
  max_new_tokens: 128
  no_repeat_ngram_size: 4
output:
  dir: run
"""


def write_data(folder: Path, seed: int = 0) -> None:
    with open(SOURCE, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    rows = [r for r in rows if r.get("answer") and len(r["answer"]) < 700]
    random.Random(seed).shuffle(rows)
    for name, part in {"train": rows[:120], "validation": rows[120:150], "test": rows[150:170]}.items():
        with open(folder / f"{name}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in part)


def main(out: str, overrides: list[str]) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    write_data(folder)
    (folder / "config.yaml").write_text(CONFIG, encoding="utf-8")
    tunesmith = str(Path(sys.executable).with_name("tunesmith"))
    planned = subprocess.run([tunesmith, "plan", "config.yaml"], cwd=folder, capture_output=True, text=True, check=True)
    row = next(line for line in planned.stdout.splitlines() if line.startswith("this machine"))
    subprocess.run([tunesmith, "train", "config.yaml", "output.overwrite=true", *overrides], cwd=folder, check=True)
    events = [json.loads(line) for line in open(folder / "run" / "metrics.jsonl", encoding="utf-8")]
    results = json.loads((folder / "run" / "results.json").read_text())
    print("evaluations:", ", ".join(f"{e['step']}: " + ", ".join(f"{v:.4f}" for k, v in e.items() if k == "eval_loss"
                                                               or k.startswith("validation_"))
                                     for e in events if e["event"] == "eval"))
    print("test:", {k: results[k].get("rouge_l") for k in ("base", "fine_tuned")})
    for name in ("early_stop", "restore_best"):
        print(name, next(({k: v for k, v in e.items() if k != "time"} for e in events if e["event"] == name), None))
    speed = statistics.mean(e["tokens_per_second"] for e in events if e["event"] == "train")
    tokens = results["data"]["tokens"]["train"]
    print(f"plan, this machine: {re.sub(' +', ' ', row)}")
    print(f"measured epoch: {tokens:,} tokens at {speed:.0f} tokens/s = {tokens / speed:.0f} s; "
          f"MFU {statistics.mean(e['mfu'] for e in events if e['event'] == 'train' and 'mfu' in e):.0%}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/overfit-ghr", sys.argv[2:])
