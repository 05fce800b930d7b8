"""Write a small MedQuAD subset for the evaluation example in the README.

Train and validation come from some collections, the test set from a held-out collection, so
the comparison measures transfer to unseen sources, not memorised answers. Seeded.

    .venv/bin/python bench/medquad_subset.py runs/medquad-data
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"
TRAIN_COLLECTIONS = ["3_GHR_QA", "5_NIDDK_QA", "6_NINDS_QA", "8_NHLBI_QA_XML"]
HELD_OUT = "7_SeniorHealth_QA"
MAX_ANSWER_CHARS = 700  # keeps examples within max_seq_len 256 of the default tokenizer


def rows(name: str, shortest: int = 80, longest: int = MAX_ANSWER_CHARS) -> list[dict]:
    """A collection's question / answer pairs whose answers have from `shortest` to `longest` characters."""
    with open(SOURCE / f"{name}.jsonl", encoding="utf-8") as handle:
        found = [json.loads(line) for line in handle]
    return [{"question": r["question"].strip(), "answer": r["answer"].strip()} for r in found
            if shortest <= len(r["answer"]) <= longest]


def main(out: str, n_train: int = 160, n_validation: int = 8, n_test: int = 24, seed: int = 0) -> None:
    rng = random.Random(seed)
    pool = [r for name in TRAIN_COLLECTIONS for r in rows(name)]
    rng.shuffle(pool)
    held_out = rows(HELD_OUT)
    rng.shuffle(held_out)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": pool[:n_train], "validation": pool[n_train:n_train + n_validation], "test": held_out[:n_test]}
    for split, records in splits.items():
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
        print(f"{folder / split}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/medquad-data")
