"""The demo's printed evidence: the baselines side by side with the fine-tuned model's lead, the verdict,
and one general-ability line."""
from tunesmith.eval.evidence import evidence_lines


def test_demo_prints_baselines_verdict_and_general_line():
    diff = lambda name, d, lo, hi: {"baseline": name, "candidate": "fine-tuned", "metric": "all_fields",  # noqa: E731
                                    "difference": d, "low": lo, "high": hi}
    results = {
        "baselines": {"primary_metric": "all_fields", "verdict": "fine-tuning beats base + retrieval by +0.600",
                      "models": {"base": {"all_fields": 0.0}, "base 3-shot": {"all_fields": 0.2},
                                 "base + retrieval": {"all_fields": 0.35}, "fine-tuned + retrieval": {"all_fields": 0.9},
                                 "fine-tuned": {"all_fields": 0.95}},
                      "differences": [diff("base", 0.95, 0.9, 0.99), diff("base 3-shot", 0.75, 0.66, 0.83),
                                      diff("base + retrieval", 0.6, 0.5, 0.7), diff("fine-tuned + retrieval", 0.05, 0.0, 0.1)]},
        "general": {"items": {"arc_easy": 50, "mmlu": 50}, "warnings": ["warning: lost 3.0 points"],
                    "differences": [{"set": "arc_easy", "metric": "acc_norm", "main": True, "items": 50, "base": 40.0,
                                     "fine_tuned": 38.0, "difference": -2.0, "low": -6.0, "high": 2.0},
                                    {"set": "all", "metric": "main", "main": True, "items": 100, "base": 33.0,
                                     "fine_tuned": 32.0, "difference": -1.0, "low": -4.0, "high": 2.0}]},
    }
    lines = evidence_lines(results)
    text = "\n".join(lines)
    assert [line.split()[0] for line in lines[1:6]] == ["base", "base", "base", "fine-tuned", "fine-tuned"]
    assert "base + retrieval" in lines[3] and "35.0%" in lines[3] and "+60.0 [+50.0, +70.0] points" in lines[3]
    assert lines[5].strip() == "fine-tuned                95.0%"
    assert "verdict: fine-tuning beats base + retrieval" in text
    assert "general ability (100 probe items, arc_easy, mmlu): base 33.0 -> fine-tuned 32.0 points, -1.0 [-4.0, +2.0]" in text
    assert lines[-1].strip() == "warning: lost 3.0 points"
    assert evidence_lines({}) == []


def test_demo_ends_with_base_against_fine_tuned_then_the_run_folder():
    from tunesmith.eval.evidence import demo_lines

    lines = demo_lines({"base": {"all_fields": 0.0, "json_valid": 0.02, "eval_loss": 1.236},
                        "fine_tuned": {"all_fields": 0.96, "json_valid": 1.0, "eval_loss": 0.013, "test_examples": 50},
                        "run_dir": "runs/demo"})
    assert lines[0] == "\nDemo: support-ticket triage on 50 held-out tickets"
    assert lines[1:4] == ["  every field right: base 0.0% -> fine-tuned 96.0%",
                          "  valid JSON:        base 2.0% -> fine-tuned 100.0%",
                          "  eval loss:         base 1.236 -> fine-tuned 0.013"]
    assert lines[-1].startswith("  run folder: runs/demo")


def test_the_general_table_holds_the_main_metric_rows_only():
    """The evidence table of the general-ability probe shows each set's main figure (acc_norm for ARC,
    acc for MMLU, the pooled 'all'), not the other metric computed beside it."""
    from tunesmith.eval.evidence import general_rows

    def row(metric, main):
        return {"set": "arc_easy", "metric": metric, "main": main, "items": 50, "base": 40.0, "fine_tuned": 38.0,
                "difference": -2.0, "low": -6.0, "high": 2.0, "win": 3, "tie": 40, "loss": 7}

    header, rows = general_rows({"differences": [row("acc", False), row("acc_norm", True)]})
    assert header == ["probe", "items", "base", "fine-tuned", "difference [95% interval]", "wins / ties / losses"]
    assert rows == [["arc_easy acc_norm", 50, "40.0", "38.0", "-2.0 [-6.0, +2.0]", "3 / 40 / 7"]]
