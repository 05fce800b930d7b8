"""Is fine-tuning worth it on MedQuAD? The experiment behind docs/evaluation.md ("Is fine-tuning worth it?").

1. `tunesmith data check` on all of MedQuAD (../shared/datasets/medquad): exact and near-duplicates.
2. A seeded split: train and validation from some collections, the test set from a collection
   held out of training entirely (transfer to an unseen source, not memorised answers).
3. LoRA on the default model with the baselines on: the base zero-shot, with 3 random training
   examples, with the 3 most similar ones retrieved (BM25), and the fine-tuned model alone and
   with retrieval, all on the same test questions, each against the fine-tuned model with a
   paired 95% interval; the general-ability probe before and after.
4. ROUGE-L of every row's predictions recomputed with rouge-score, to show they are the same.

    .venv/bin/python bench/medquad_evidence.py [--out runs/medquad-evidence] [--steps 300] [--batch-size 8]
        [--train 2400] [--test 120] [--max-new-tokens 96] [--no-repeat-ngram-size N]
        [--dtype auto|float32] [--skip-check]

It prints the tables as markdown, with the time each part took.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad"  # as medquad_subset.py reads it
TRAIN_COLLECTIONS = ["3_GHR_QA", "5_NIDDK_QA", "6_NINDS_QA", "8_NHLBI_QA_XML", "4_MPlus_Health_Topics_QA", "9_CDC_QA"]
HELD_OUT = "7_SeniorHealth_QA"
MAX_ANSWER_CHARS = 1000  # keeps examples within max_seq_len 384 of the default tokenizer


def rows(name: str) -> list[dict]:
    from medquad_subset import rows as collection  # bench/ is the script's folder, first on the path

    return collection(name, 40, MAX_ANSWER_CHARS)


def write_split(folder: Path, n_train: int, n_validation: int, n_test: int, seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    pool = [r for name in TRAIN_COLLECTIONS for r in rows(name)]
    rng.shuffle(pool)
    held_out = rows(HELD_OUT)
    rng.shuffle(held_out)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": pool[:n_train], "validation": pool[n_train:n_train + n_validation], "test": held_out[:n_test]}
    paths = {}
    for split, records in splits.items():
        paths[split] = str(folder / f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in records)
    return paths


def markdown_baselines(table: dict) -> str:
    metric = table["primary_metric"]
    by = {(d["baseline"], d["metric"]): d for d in table["differences"]}
    lines = [f"| row | {metric} | answer loss | fine-tuned - row, {metric} [95% interval] | win / tie / loss |",
             "|---|---:|---:|---|---|"]
    for name, means in table["models"].items():
        d = by.get((name, metric))
        cell = f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else ""
        wtl = f"{d['win']} / {d['tie']} / {d['loss']}" if d else ""
        lines.append(f"| {name} | {means[metric]:.3f} | {means.get('answer_loss', float('nan')):.3f} | {cell} | {wtl} |")
    return "\n".join(lines) + f"\n\nverdict: {table['verdict']}"


def markdown_general(general: dict) -> str:
    lines = ["| probe | items | base | fine-tuned | difference [95% interval] | win / tie / loss |",
             "|---|---:|---:|---:|---|---|"]
    for d in general["differences"]:
        if d["main"]:
            lines.append(f"| {d['set']} {d['metric']} | {d['items']} | {d['base']:.1f} | {d['fine_tuned']:.1f} | "
                         f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}] | {d['win']} / {d['tie']} / {d['loss']} |")
    return "\n".join(lines)


def rouge_agreement(run: Path) -> str:
    """Largest difference between tunesmith's ROUGE-L and rouge-score's over every prediction file."""
    from rouge_score import rouge_scorer

    from tunesmith.eval.metrics import rouge_l

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    worst, count = 0.0, 0
    for path in sorted(run.glob("predictions*.jsonl")):
        for line in open(path, encoding="utf-8"):
            row = json.loads(line)
            ours = rouge_l(row["answer"], row["reference"])
            theirs = scorer.score(row["reference"], row["answer"])["rougeL"].fmeasure
            worst, count = max(worst, abs(ours - theirs)), count + 1
    return f"ROUGE-L against rouge-score 0.1.2 (rougeL, use_stemmer=False): largest difference {worst:.2e} over {count} answers"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/medquad-evidence")
    parser.add_argument("--train", type=int, default=2400)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--general-limit", type=int, default=None)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=0, help="eval.no_repeat_ngram_size: the loop guard")
    parser.add_argument("--dtype", default="auto", help="model.dtype: float32 repeats the runs made on hosts without fast bf16")
    parser.add_argument("--skip-check", action="store_true")
    args = parser.parse_args()

    from tunesmith.api import train
    from tunesmith.data.check import check_data, format_report

    out = Path(args.out)
    if not args.skip_check:
        start = time.perf_counter()
        report = check_data(str(SOURCE), "default", out / "data-check", {"validation_share": 0.05})
        print(f"## data check of all MedQuAD ({time.perf_counter() - start:.0f} s)\n\n```\n{format_report(report)}\n```\n")
    files = write_split(out / "data", args.train, args.validation, args.test, seed=0)
    config = {
        "model": {"name": "default", "dtype": args.dtype},
        "data": {**files, "max_seq_len": 384},
        "adapter": {"method": "lora", "r": 16, "alpha": 32},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": 1e-3, "log_every": 10},
        "eval": {"every_steps": max(1, args.steps // 4), "batch_size": 16, "max_new_tokens": args.max_new_tokens,
                 "kshot": 3, "retrieval_k": 3, "general": True, "general_limit": args.general_limit,
                 "no_repeat_ngram_size": args.no_repeat_ngram_size},
        "output": {"dir": str(out / "run"), "overwrite": True},
    }
    start = time.perf_counter()
    results = train(config)
    seconds = time.perf_counter() - start
    print(f"## MedQuAD: {results['data']['examples']} examples, {results['steps']} steps, "
          f"{results['train_seconds']:.0f} s training, {seconds:.0f} s in all\n")
    print(markdown_baselines(results["baselines"]) + "\n")
    print(markdown_general(results["general"]) + "\n")
    print(rouge_agreement(out / "run"))


if __name__ == "__main__":
    main()
