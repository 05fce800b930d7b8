"""tunesmith's general-ability scorer against lm-evaluation-harness, on the same items and model.

Both score the shipped probe's multiple-choice sets (or --data FOLDER) with the default model
(or --model), in fp32 on the CPU, zero-shot. lm-evaluation-harness cannot reach the hub here, so
each set becomes a local task: the harness's own default prompt template for that set, written
as a task config over the local JSONL file (datasets' `json` builder). Prints, per set, both
accuracies, their difference in points, and the share of items with the same outcome (both right
or both wrong). GSM8K (generated answers) is not compared.

    .venv/bin/pip install -e ".[lm_eval]"
    .venv/bin/python bench/general_vs_lm_eval.py [--limit 100] [--model default] [--data FOLDER]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MMLU_TEXT = ("The following are multiple choice questions (with answers) about {{subject.replace('_', ' ')}}.\n\n"
             "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:")
# The harness's task templates (lm_eval/tasks/{arc,hellaswag,mmlu,truthfulqa}), over the probe's fields.
TEMPLATES = {
    "arc_easy": ("Question: {{question}}\nAnswer:", "{{choices}}", ["acc", "acc_norm"]),
    "arc_challenge": ("Question: {{question}}\nAnswer:", "{{choices}}", ["acc", "acc_norm"]),
    "hellaswag": ("{{question}}", "{{choices}}", ["acc", "acc_norm"]),
    "mmlu": (MMLU_TEXT, ["A", "B", "C", "D"], ["acc"]),
    "truthfulqa_mc1": (None, "{{choices}}", ["acc"]),  # the primer is filled in below
}


def task_config(name: str, path: Path) -> dict:
    from tunesmith.eval.general import TRUTHFULQA_PRIMER

    text, choices, metrics = TEMPLATES[name]
    if name == "truthfulqa_mc1":
        text = TRUTHFULQA_PRIMER + "\n\nQ: {{question}}\nA:"
    return {"task": f"tunesmith_{name}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": text, "doc_to_choice": choices,
            "doc_to_target": "answer", "metric_list": [{"metric": m} for m in metrics]}


def harness(model, tokenizer, files: dict[str, Path], folder: Path) -> dict[str, dict]:
    """{set: {metric: mean, 'picks': per-item acc}} from lm-evaluation-harness."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name, path in files.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_config(name, path), sort_keys=False))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=16)
    out = simple_evaluate(model=lm, tasks=[f"tunesmith_{n}" for n in files], num_fewshot=0, log_samples=True,
                          task_manager=TaskManager(include_path=str(folder)), bootstrap_iters=0)
    found = {}
    for name in files:
        results = out["results"][f"tunesmith_{name}"]
        samples = sorted(out["samples"][f"tunesmith_{name}"], key=lambda s: s["doc_id"])
        found[name] = {m: results[f"{m},none"] for m in TEMPLATES[name][2]}
        found[name]["items"] = [{m: float(s[m]) for m in TEMPLATES[name][2]} for s in samples]
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", default=None, help="probe folder (default: the shipped probe)")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each set")
    parser.add_argument("--sets", default=",".join(TEMPLATES))
    args = parser.parse_args()

    import torch

    from tunesmith.eval.general import load_probe, score_probe
    from tunesmith.models import load_model, load_tokenizer

    model, tokenizer = load_model(args.model, torch.float32), load_tokenizer(args.model)
    probe = load_probe(args.data, args.sets.split(","), args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = {}
        for name, items in probe.items():
            files[name] = folder / f"{name}.jsonl"
            files[name].write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
        start = time.perf_counter()
        ours = score_probe(model, tokenizer, probe, "tunesmith")
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        theirs = harness(model, tokenizer, files, folder)
        theirs_seconds = time.perf_counter() - start
    print(f"model {args.model}, fp32, zero-shot; tunesmith {ours_seconds:.0f} s, lm-evaluation-harness "
          f"{theirs_seconds:.0f} s")
    print(f"{'set':<16}{'items':>6}{'metric':>10}{'tunesmith':>11}{'lm-eval':>9}{'diff (points)':>15}{'same outcome':>14}")
    worst = 0.0
    for name, rows in ours.items():
        for metric in TEMPLATES[name][2]:
            mine = 100 * sum(r[metric] for r in rows) / len(rows)
            other = 100 * theirs[name][metric]
            same = sum(a[metric] == b[metric] for a, b in zip(rows, theirs[name]["items"])) / len(rows)
            worst = max(worst, abs(mine - other))
            print(f"{name:<16}{len(rows):>6}{metric:>10}{mine:>11.1f}{other:>9.1f}{mine - other:>+15.1f}{same:>14.1%}")
    print(f"largest difference: {worst:.1f} points" + (" (within 1 point)" if worst <= 1.0 else " (MORE than 1 point)"))
    sys.exit(0 if worst <= 1.0 else 1)


if __name__ == "__main__":
    main()
