"""The demo run exported to GGUF q8_0 and read back: does it answer the demo test set as well?

Exports RUN (default runs/demo, written by `make demo`) with `--format gguf,ollama --quant q8_0`
(verified: top-1 agreement and template parity, see tunesmith.export.gguf), then scores the demo
test set with tunesmith's own evaluation (tunesmith.api.evaluate: greedy generation through each
model's own chat template, JSON field scores) for the run's model and for the GGUF as transformers
reads it back, with the GGUF's embedded tokenizer and chat template. Both in the same dtype.

    .venv/bin/python bench/export_demo.py runs/demo [--limit N]

Exit status 1 when the GGUF's every-field accuracy is more than 2 points below the run's model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tunesmith.api import evaluate
from tunesmith.config import load_config
from tunesmith.export import export

ALLOWED_DROP = 0.02


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="runs/demo")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    args = parser.parse_args()
    run = Path(args.run)
    test = run / "data" / "test.jsonl"
    cfg = load_config(run / "config.yaml")

    started = time.perf_counter()
    check = export(run, formats="gguf,ollama", quant="q8_0")["gguf"]
    print(f"export: {check['file']} in {time.perf_counter() - started:.0f} s; logits max abs diff "
          f"{check['max_abs_diff']:.3g} ({check['relative_diff']:.2%} of scale), top-1 agreement "
          f"{check['top1_agreement']:.2%} of {check['positions']} answer positions "
          f"({check['top1_all_positions']:.2%} of all), prompts equal "
          f"{check['prompts_equal']}/{check['prompts_checked']}", flush=True)

    rows = {}
    for label, spec in (("run (adapter)", str(run)), ("GGUF q8_0 read back", check["file"])):
        rows[label] = evaluate(spec, str(test), cfg.eval.max_new_tokens, cfg.eval.batch_size, args.limit)
    print(f"\n{'model':<22} {'every field':>12} {'valid JSON':>11} {'eval loss':>10} {'examples':>9}")
    for label, scores in rows.items():
        print(f"{label:<22} {scores.get('all_fields', 0):>12.1%} {scores.get('json_valid', 0):>11.1%} "
              f"{scores['eval_loss']:>10.4f} {scores['test_examples']:>9}")
    ours, theirs = (scores.get("all_fields", 0) for scores in rows.values())
    print(f"\nGGUF - run: {100 * (theirs - ours):+.1f} points (allowed: -{100 * ALLOWED_DROP:.0f})")
    print(json.dumps(rows, indent=2), file=sys.stderr)
    return 0 if theirs >= ours - ALLOWED_DROP else 1


if __name__ == "__main__":
    sys.exit(main())
