"""Preference and reward tuning on the demo task (README "Beyond imitation", docs/objectives.md).

A deliberately weak SFT model (100 training tickets) is improved two ways: `tunesmith pairs` + DPO,
and GRPO with the JSON-fields scorer as the reward. All three are scored on the same 200 held-out
tickets; this script writes the prompts the two methods train on and prints the table, with each
method's difference to SFT and its paired bootstrap 95% interval.

    python bench/prefs_demo.py prompts runs/prefs          # after the SFT run (runs/prefs/sft)
    python bench/prefs_demo.py table runs/prefs            # after the DPO and GRPO runs

The full sequence of commands is in docs/objectives.md.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from tunesmith.data.demo import example, make_ticket
from tunesmith.eval.compare import paired_bootstrap, win_tie_loss
from tunesmith.eval.metrics import json_example_scores
from tunesmith.runs import RunFolder, read_jsonl


def write_prompts(root: Path, count: int, validation: int, seed: int) -> None:
    """New tickets (none in the SFT run's train, validation or test files) as prompts with their JSON
    label as reference; the first `validation` go to a separate file (GRPO's eval reward). The training
    prompts with their references are also written as SFT data: continued SFT on the same answers is
    the control for pairs whose chosen answer is the reference."""
    seen = set()
    for name in ("train", "validation", "test"):
        for row in read_jsonl(root / "sft" / "data" / f"{name}.jsonl"):
            seen.add(row["messages"][1]["content"])
    rng = random.Random(seed)
    rows = []
    while len(rows) < count + validation:
        ticket, label = make_ticket(rng)
        if ticket in seen:
            continue
        seen.add(ticket)
        messages = example(ticket, label)["messages"]
        rows.append({"prompt": messages[:2], "reference": messages[2]["content"]})
    for name, part in (("prompts.jsonl", rows[:count]), ("prompts-validation.jsonl", rows[count:])):
        with open(root / name, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(r) + "\n" for r in part)
        print(f"{root / name}: {len(part)} prompts")
    with open(root / "references-sft.jsonl", "w", encoding="utf-8") as out:  # the control: SFT on the same answers
        out.writelines(json.dumps({"messages": r["prompt"] + [{"role": "assistant", "content": r["reference"]}]}) + "\n"
                       for r in rows[:count])
    print(f"{root / 'references-sft.jsonl'}: the {count} prompts with their references, as SFT data")


def all_fields(run: Path) -> np.ndarray:
    rows = read_jsonl(RunFolder(run).predictions())
    return np.array([json_example_scores(r["answer"], r["reference"])["all_fields"] for r in rows])


def table(root: Path, runs: list[str]) -> None:
    base = all_fields(root / runs[0])
    print(f"| {len(base)} held-out tickets | every field right | vs {runs[0]} (95% interval), wins/ties/losses "
          "| train seconds |")
    print("|---|---:|---:|---:|")
    for name in runs:
        scores = all_fields(root / name)
        results = RunFolder(root / name).read_results() or {}
        seconds = results.get("train_seconds", "-")
        if name == runs[0]:
            print(f"| {name} | {scores.mean():.1%} | | {seconds} |")
            continue
        found = paired_bootstrap(base, scores, samples=10000, seed=0)
        verdict = "better" if found["low"] > 0 else ("worse" if found["high"] < 0 else "not different")
        count = win_tie_loss(base, scores, lower_is_better=False)
        print(f"| {name} | {scores.mean():.1%} | {found['difference']:+.1%} [{found['low']:+.1%}, "
              f"{found['high']:+.1%}], {count['win']}/{count['tie']}/{count['loss']} ({verdict}) | {seconds} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["prompts", "table"])
    parser.add_argument("root", type=Path, help="folder holding the runs (sft, dpo, grpo)")
    parser.add_argument("--count", type=int, default=160)
    parser.add_argument("--validation", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runs", default="sft,dpo,grpo")
    args = parser.parse_args()
    if args.step == "prompts":
        write_prompts(args.root, args.count, args.validation, args.seed)
    else:
        table(args.root, args.runs.split(","))


if __name__ == "__main__":
    main()
