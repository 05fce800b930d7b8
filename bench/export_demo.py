"""The demo run exported to GGUF and read back: does it answer the demo test set as well?

Exports RUN (default runs/demo, written by `make demo`) with `--format gguf,ollama --quant QUANT`
(default q8_0; verified: mean KL divergence and top-1 agreement against the merged model, and template
parity, see tunesmith.export.gguf_check), then scores the demo test set with tunesmith's own evaluation
(tunesmith.api.evaluate: greedy generation through each model's own chat template, JSON field scores)
for the run's model and for the GGUF as transformers reads it back, with the GGUF's embedded tokenizer
and chat template. Both in the same dtype. With
llama-cpp-python installed (the llamacpp extra), the GGUF is also scored in llama.cpp itself (greedy,
the training tokenizer's prompt tokens, stopped at the end-of-turn token).

    .venv/bin/python bench/export_demo.py runs/demo [--quant q4_k_m] [--limit N]

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
    parser.add_argument("--quant", default="q8_0", help="GGUF type (q4_k_m, q5_k_m need the llamacpp extra)")
    args = parser.parse_args()
    run = Path(args.run)
    test = run / "data" / "test.jsonl"
    cfg = load_config(run / "config.yaml")

    started = time.perf_counter()
    check = export(run, formats="gguf,ollama", quant=args.quant)["gguf"]
    print(f"export: {check['file']} in {time.perf_counter() - started:.0f} s; logits max abs diff "
          f"{check['max_abs_diff']:.3g} ({check['relative_diff']:.2%} of scale), top-1 agreement "
          f"{check['top1_agreement']:.2%} of {check['positions']} answer positions "
          f"({check['top1_all_positions']:.2%} of all), prompts equal "
          f"{check['prompts_equal']}/{check['prompts_checked']}", flush=True)

    rows = {}
    for label, spec in (("run (adapter)", str(run)), (f"GGUF {args.quant} read back", check["file"])):
        rows[label] = evaluate(spec, str(test), cfg.eval.max_new_tokens, cfg.eval.batch_size, args.limit)
    from tunesmith.export import llamacpp

    if llamacpp.available():
        rows[f"GGUF {args.quant} llama.cpp"] = in_llama_cpp(run, check["file"], test, cfg.eval.max_new_tokens, args.limit)
    print(f"\n{'model':<22} {'every field':>12} {'valid JSON':>11} {'eval loss':>10} {'examples':>9}")
    for label, scores in rows.items():
        print(f"{label:<22} {scores.get('all_fields', 0):>12.1%} {scores.get('json_valid', 0):>11.1%} "
              f"{scores['eval_loss']:>10.4f} {scores['test_examples']:>9}")
    ours, *theirs = (scores.get("all_fields", 0) for scores in rows.values())
    for label, value in zip(list(rows)[1:], theirs):
        print(f"{label} - run: {100 * (value - ours):+.1f} points (allowed: -{100 * ALLOWED_DROP:.0f})")
    print(json.dumps(rows, indent=2), file=sys.stderr)
    return 0 if all(value >= ours - ALLOWED_DROP for value in theirs) else 1


def in_llama_cpp(run: Path, gguf_file: str, test: Path, max_new_tokens: int, limit: int | None) -> dict:
    """Greedy answers of the GGUF in llama.cpp, scored as tunesmith scores the run."""
    from tunesmith.data.prepare import load_conversations
    from tunesmith.data.tokenize import end_of_turn_strings, prompt_ids
    from tunesmith.eval.metrics import example_scores, mean_scores
    from tunesmith.export import llamacpp
    from tunesmith.models import load_tokenizer
    from tunesmith.runs import trained_folder

    tokenizer = load_tokenizer(str(trained_folder(run)))
    conversations, _ = load_conversations(str(test), None)
    conversations = conversations[:limit] if limit else conversations
    stops = {tokenizer.convert_tokens_to_ids(t) for t in end_of_turn_strings(tokenizer)}
    answers = llamacpp.generate(Path(gguf_file), [prompt_ids(tokenizer, c) for c in conversations], max_new_tokens, stops)
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    scores = mean_scores(example_scores(texts, [c[-1]["content"] for c in conversations]))
    return {**scores, "eval_loss": float("nan"), "test_examples": len(conversations)}


if __name__ == "__main__":
    sys.exit(main())
