"""The end of training answers the evidence questions: the base, k-shot, retrieval and fine-tuned
rows in one table with intervals and a verdict, and general ability before and after."""
import json

from tunesmith.api import train
from tunesmith.eval.general import load_probe

from helpers import write_jsonl


def small_probe(folder):
    """Three items of two shipped probe sets (the tiny model scores them in a second)."""
    folder.mkdir()
    for name, items in load_probe(sets=["arc_easy", "gsm8k"], limit=3).items():
        write_jsonl(folder / f"{name}.jsonl", items)
    return folder


def test_train_scores_every_baseline_and_general_ability(tiny_config, tmp_path, capsys):
    tiny_config["eval"].update(kshot=2, retrieval_k=2, general=True, test_limit=4, max_new_tokens=8,
                               general_data=str(small_probe(tmp_path / "probe")), general_margin=0.0)
    results = train(tiny_config)
    table = results["baselines"]
    rows = ["base", "base 2-shot", "base + retrieval", "fine-tuned + retrieval", "fine-tuned"]
    assert list(table["models"]) == rows
    assert table["primary_metric"] == "all_fields" and table["verdict"]
    n = results["fine_tuned"]["test_examples"]
    for d in table["differences"]:
        assert d["candidate"] == "fine-tuned" and d["win"] + d["tie"] + d["loss"] == n
        assert d["low"] <= d["difference"] <= d["high"]
    assert results["base"]["all_fields"] == table["models"]["base"]["all_fields"]
    run = tmp_path / "run"
    for name in ("predictions.jsonl", "predictions_base.jsonl", "predictions_base_2-shot.jsonl",
                 "predictions_base_retrieval.jsonl", "predictions_fine-tuned_retrieval.jsonl"):
        assert len((run / name).read_text().splitlines()) == n, name
    general = results["general"]
    assert general["items"] == {"arc_easy": 3, "gsm8k": 3}
    assert {"arc_easy/acc", "arc_easy/acc_norm", "gsm8k/exact_match"} <= set(general["base"])
    assert {(d["set"], d["metric"]) for d in general["differences"]} >= {("arc_easy", "acc_norm"), ("gsm8k", "exact_match")}
    # A margin of 0 warns about every set the fine-tuned model lost on, and only those.
    lost = [d for d in general["differences"] if d["main"] and d["difference"] < 0]
    assert len([w for w in general["warnings"] if w.startswith("warning:")]) == len(lost)
    assert general["warnings"][-1].startswith("note: arc_easy has 3 items, gsm8k has 3 items; one item is 33 points")
    err = capsys.readouterr().err
    assert "verdict: " in err and "general ability (points)" in err
    # The tickets' JSON answers are longer than 8 tokens: the text scores are of cut answers, and it says so.
    assert f"warning: {n} of {n} test answers are longer than eval.max_new_tokens=8" in err
    saved = json.loads((run / "results.json").read_text())
    assert saved["baselines"]["verdict"] == table["verdict"] and "general" in saved
    report = (run / "report.html").read_text()
    assert "base + retrieval" in report and "Verdict:" in report and "General ability kept?" in report
