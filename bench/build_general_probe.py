"""Write the general-ability probe shipped with tunesmith (src/tunesmith/eval/probes/).

A seeded sample of each set of ../shared/datasets/general/, stratified by subject where the set
has one (MMLU subjects, HellaSwag activities, TruthfulQA categories): each subject gets its
share of the sample in proportion to its size (largest remainders), the items within a subject
are drawn at random, and the whole sample is shuffled, so the first N items of a file are a
random sample too (eval.general_limit). Deterministic: rerunning gives the same files.

    .venv/bin/python bench/build_general_probe.py [SOURCE_FOLDER]
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT.parent / "shared" / "datasets" / "general"
TARGET = ROOT / "src" / "tunesmith" / "eval" / "probes"
# probe set -> (source file, items); sized so the whole default probe scores the default model
# on 2 CPU cores within about 5 minutes (docs/evaluation.md).
SETS = {
    "arc_easy": ("arc_easy_test.jsonl", 200),
    "arc_challenge": ("arc_challenge_test.jsonl", 200),
    "hellaswag": ("hellaswag_val.jsonl", 200),
    "mmlu": ("mmlu_test.jsonl", 200),
    "truthfulqa_mc1": ("truthfulqa_mc1.jsonl", 200),
    "gsm8k": ("gsm8k_test.jsonl", 100),
}
LICENSES = ["ARC_CC-BY-SA-4.0.txt", "GSM8K_MIT_openai-grade-school-math_LICENSE.txt",
            "HellaSwag_MIT_rowanz-hellaswag_LICENSE.txt", "MMLU_MIT_hendrycks-test_LICENSE.txt",
            "TruthfulQA_Apache-2.0_sylinrl-TruthfulQA_LICENSE.txt"]


def stratified(items: list[dict], n: int, rng: random.Random) -> list[dict]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        groups[item.get("subject", "")].append(item)
    names = sorted(groups)
    exact = {g: n * len(groups[g]) / len(items) for g in names}
    counts = {g: int(exact[g]) for g in names}
    by_remainder = sorted(names, key=lambda g: (-(exact[g] - counts[g]), g))
    for g in by_remainder[: n - sum(counts.values())]:
        counts[g] += 1
    picked = [item for g in names for item in rng.sample(groups[g], counts[g])]
    rng.shuffle(picked)
    return picked


def main(source: Path = SOURCE) -> None:
    TARGET.mkdir(parents=True, exist_ok=True)
    for name, (file, n) in SETS.items():
        items = [json.loads(line) for line in open(source / file, encoding="utf-8")]
        picked = stratified(items, n, random.Random(f"tunesmith-probe-{name}"))
        with open(TARGET / f"{name}.jsonl", "w", encoding="utf-8") as out:
            for item in picked:
                keep = {k: item[k] for k in ("id", "subject", "question", "choices", "answer", "final") if k in item}
                out.write(json.dumps(keep, ensure_ascii=False) + "\n")
        print(f"{name}: {len(picked)} of {len(items)} items")
    (TARGET / "licenses").mkdir(exist_ok=True)
    for license_file in LICENSES:
        shutil.copyfile(source / "licenses" / license_file, TARGET / "licenses" / license_file)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE)
