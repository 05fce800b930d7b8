"""Continued pre-training on raw text: does the model learn the domain's text, and keep its general ability?

MedQuAD's NIDDK answers grouped by topic into one document each (148 documents): 120 to train on
(10% of them held out for the eval loss), 20 others as the test file. LoRA on the default model
for `train.max_steps` steps at 512 tokens a row; the test documents' loss, base against
fine-tuned with the paired 95% interval over documents, and the general-ability probe before and
after. Time it on a quiet machine.

    .venv/bin/python bench/continued_pretraining.py runs/cpt-niddk train.max_steps=20
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "medquad" / "5_NIDDK_QA.jsonl"
CONFIG = """data:
  train: train.jsonl
  test: test.jsonl
train:
  max_steps: 20
eval:
  general: true
output:
  dir: run
"""


def documents() -> list[str]:
    """One document per topic: its answers in file order, each once."""
    topics: dict[str, list[str]] = {}
    for line in SOURCE.open(encoding="utf-8"):
        record = json.loads(line)
        answers = topics.setdefault(record["focus"], [])
        if record["answer"] not in answers:
            answers.append(record["answer"])
    return ["\n\n".join(answers) for answers in topics.values()]


def main(folder: str, *overrides: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    docs = documents()
    for name, part in (("train.jsonl", docs[:120]), ("test.jsonl", docs[120:140])):
        (out / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part), encoding="utf-8")
    (out / "config.yaml").write_text(CONFIG, encoding="utf-8")
    tunesmith = Path(sys.executable).with_name("tunesmith")
    subprocess.run([str(tunesmith), "train", "config.yaml", "output.overwrite=true", *overrides], cwd=out, check=True)
    results = json.loads((out / "run" / "results.json").read_text())
    table = results["baselines"]
    print(f"documents: train {len(docs[:120])}, test {len(docs[120:140])}; steps {results['steps']}, "
          f"{results['train_seconds']:.0f} s, {results['tokens_per_second']} tokens/s")
    print(f"eval loss: base {results['base']['eval_loss']:.3f} -> fine-tuned {results['fine_tuned']['eval_loss']:.3f}")
    print(f"verdict: {table['verdict']}")
    if "general" in results:
        from tunesmith.eval.general import format_probe

        print(format_probe(results["general"]["differences"]))


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    main(*sys.argv[1:])
