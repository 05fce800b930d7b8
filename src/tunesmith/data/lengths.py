"""What to change when max_seq_len drops many examples: `data check`, `train` and the error of a data
set it empties say it in one line."""
from __future__ import annotations

HINT_ABOVE = 0.1  # share of the examples lost to max_seq_len above which the report says what to change
KEEP_PERCENT = 95  # the share of the examples the suggested max_seq_len keeps
ROUND_TO = 64  # the suggested max_seq_len is a multiple of this


def length_hint(prepared, cfg) -> dict | None:
    """When more than a tenth of the examples is lost to max_seq_len: the max_seq_len that keeps 95%
    of them, and how many `overlong: truncate` would keep (those with an answer token left in the
    first max_seq_len tokens). None otherwise."""
    lost = len(prepared.too_long) - prepared.truncated  # dropped: over-long, or truncated to no answer
    # Test examples are kept whole whatever their length (prepare): not counted here.
    kept = [len(e.input_ids) for s in prepared.splits.values() if s.name != "test" for e in s.encoded]
    for _ in range(prepared.truncated):  # a truncated example counts with its length before the cut
        kept.remove(cfg.max_seq_len)
    lengths = sorted(kept + [tokens for tokens, _ in prepared.too_long])
    if not lengths or lost <= HINT_ABOVE * len(lengths):
        return None
    needed = lengths[-(-len(lengths) * KEEP_PERCENT // 100) - 1]  # the shortest length that keeps 95%
    suggested = max(16, -(-needed // ROUND_TO) * ROUND_TO)
    return {"lost": lost, "examples": len(lengths), "lost_share": round(lost / len(lengths), 4),
            "max_seq_len": cfg.max_seq_len, "overlong": cfg.overlong, "suggested_max_seq_len": suggested,
            "suggested_keeps": round(sum(n <= suggested for n in lengths) / len(lengths), 4),
            "truncate_keeps": sum(0 <= first < cfg.max_seq_len for _, first in prepared.too_long)}


def hint_line(hint: dict) -> str:
    """length_hint's advice in one line (`data check` and `train` print it)."""
    return (f"hint: {hint['lost_share']:.0%} of the examples ({hint['lost']} of {hint['examples']}) are lost to "
            f"max_seq_len {hint['max_seq_len']}; max_seq_len={hint['suggested_max_seq_len']} keeps "
            f"{hint['suggested_keeps']:.1%} of them"
            + (f"; overlong=truncate would keep {hint['truncate_keeps']} of the {hint['lost']} "
               f"(cut to {hint['max_seq_len']} tokens)" if hint["overlong"] == "drop" else ""))
