"""A run's evidence as printed lines (the demo prints them): the baselines side by side with the
fine-tuned model's lead and its 95% interval, the verdict, and the general-ability line."""
from __future__ import annotations


def demo_lines(results: dict) -> list[str]:
    """What `tunesmith demo` prints at its end: base against fine-tuned on the held-out tickets, then the evidence."""
    base, tuned = results["base"], results["fine_tuned"]
    nan = float("nan")
    return [f"\nDemo: support-ticket triage on {tuned.get('test_examples', 0)} held-out tickets",
            f"  every field right: base {base.get('all_fields', 0):.1%} -> fine-tuned {tuned.get('all_fields', 0):.1%}",
            f"  valid JSON:        base {base.get('json_valid', 0):.1%} -> fine-tuned {tuned.get('json_valid', 0):.1%}",
            f"  eval loss:         base {base.get('eval_loss', nan):.3f} -> fine-tuned {tuned.get('eval_loss', nan):.3f}",
            *evidence_lines(results),
            f"  run folder: {results['run_dir']} (adapter, metrics.jsonl, predictions, results.json)"]


def evidence_lines(results: dict) -> list[str]:
    """The demo's baselines side by side (every field right, with the fine-tuned model's lead and its
    95% interval) and its general-ability line."""
    lines = []
    table = results.get("baselines")
    if table:
        metric = table["primary_metric"]
        lead = {d["baseline"]: d for d in table["differences"] if d["metric"] == metric}
        lines.append(f"  {metric} on the same tickets, and the fine-tuned model's lead [95% interval]:")
        for name, means in table["models"].items():
            d = lead.get(name)
            versus = f"   {100 * d['difference']:+6.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] points" if d else ""
            lines.append(f"    {name:<24}{means[metric]:>7.1%}{versus}")
        lines.append(f"  verdict: {table['verdict']}")
    general = results.get("general")
    if general:
        row = next(d for d in reversed(general["differences"]) if d["main"])
        lines.append(f"  general ability ({row['items']} probe items, {', '.join(general['items'])}): base {row['base']:.1f} "
                     f"-> fine-tuned {row['fine_tuned']:.1f} points, {row['difference']:+.1f} "
                     f"[{row['low']:+.1f}, {row['high']:+.1f}]")
        lines += [f"  {w}" for w in general.get("warnings", [])]
    return lines


# The same evidence as table rows, for the model card (markdown) and the HTML report: one place decides
# which table a run shows and what its rows hold, each caller only formats the cells.

# A figure of the machine, not of the model: the same merged weights generate at 6 or 30 tokens/s with the
# load beside them and the warm-up of the first batch. Kept in results.json, left out of base-vs-tuned tables.
MACHINE_FIGURES = ("generated_tokens_per_second",)


def model_figures(figures: dict) -> dict:
    return {key: value for key, value in figures.items() if key not in MACHINE_FIGURES}


def shown_comparisons(results: dict, comparison: dict) -> list[dict]:
    """The run's own baselines table (its test split, at training's end), then `tunesmith compare`'s
    where it has one: a later compare on other data, or a few examples, is shown beside the run's own
    verdict, never in its place."""
    return [table for table in (results.get("baselines") or {}, comparison) if table.get("models")]


def from_compare(table: dict) -> bool:
    """A `tunesmith compare` table (scored later, on a named file), not the run's own."""
    return "examples_scored" in table


def metric_rows(table: dict) -> tuple[list[str], list[list]]:
    """(header, rows): each metric's mean for every model of the table."""
    names = list(table["models"])
    metrics = list(dict.fromkeys(m for means in table["models"].values() for m in means))
    return ["metric", *names], [[m, *(table["models"][n].get(m) for n in names)] for m in metrics]


def difference_rows(table: dict) -> tuple[list[str], list[list]]:
    """(header, rows): each paired difference with its 95% interval and wins / ties / losses."""
    rows = [[f"{d['candidate']} - {d['baseline']}", d["metric"], f"{d['difference']:+.4f}",
             f"[{d['low']:+.4f}, {d['high']:+.4f}]", f"{d['win']} / {d['tie']} / {d['loss']}"]
            for d in table.get("differences", [])]
    return ["comparison", "metric", "difference", "95% interval", "wins / ties / losses"], rows


def general_rows(general: dict) -> tuple[list[str], list[list]]:
    """(header, rows): the general-ability probe, base vs fine-tuned in points of 100, main metrics only."""
    rows = [[f"{d['set']} {d['metric']}", d["items"], f"{d['base']:.1f}", f"{d['fine_tuned']:.1f}",
             f"{d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]", f"{d['win']} / {d['tie']} / {d['loss']}"]
            for d in general.get("differences", []) if d.get("main")]
    return ["probe", "items", "base", "fine-tuned", "difference [95% interval]", "wins / ties / losses"], rows
