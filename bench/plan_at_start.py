"""The estimate `tunesmith train` prints at its start against the peak it then measures.

A real 4-step run of the default model on 33 MedQuAD question/answer examples (the first of
3_GHR_QA whose answers fit) at max_seq_len 512, batch 4, for LoRA and QLoRA, each in a fresh
process (`tunesmith train`, its own end-of-run figures from results.json):

    .venv/bin/python bench/plan_at_start.py [--methods lora,qlora] [--steps 4] [--set model.dtype=float32]

Prints planned and measured peak training memory and their ratio; the bar is within 20%.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEDQUAD = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"


def write_data(folder: Path, n: int = 33) -> Path:
    rows = [json.loads(line) for line in open(MEDQUAD / "3_GHR_QA.jsonl", encoding="utf-8")]
    picked = [{"question": r["question"], "answer": r["answer"]} for r in rows if 200 <= len(r["answer"]) <= 1500][:n]
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more config overrides for every run, e.g. --set model.dtype=float32")
    args = parser.parse_args()
    print(f"{'method':<8}{'planned':>10}{'measured':>10}{'ratio':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        data = write_data(Path(tmp))
        config = Path(tmp) / "config.yaml"
        config.write_text("model: default\n")
        for method in args.methods.split(","):
            run = Path(tmp) / method
            done = subprocess.run([sys.executable, "-m", "tunesmith.cli", "train", str(config), f"data.train={data}",
                                   "data.max_seq_len=512", f"adapter.method={method}", f"train.max_steps={args.steps}",
                                   "train.batch_size=4", "eval.generate=false", "eval.report=false",
                                   f"output.dir={run}", *args.set], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method:<8} failed: {done.stderr.strip().splitlines()[-1]}")
                continue
            peak = json.loads((run / "results.json").read_text())["peak_memory"]
            ratio = peak["predicted"] / peak["measured"]
            print(f"{method:<8}{peak['predicted'] / 2**20:>8.0f} M{peak['measured'] / 2**20:>8.0f} M{ratio:>8.2f}")


if __name__ == "__main__":
    main()
