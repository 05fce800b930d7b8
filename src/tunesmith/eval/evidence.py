"""A run's evidence as printed lines (the demo prints them): the baselines side by side with the
fine-tuned model's lead and its 95% interval, the verdict, and the general-ability line."""
from __future__ import annotations


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
