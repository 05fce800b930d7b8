"""Exports of a trained run, each checked before it is called done."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError


def export(run: str | Path, out: str | Path | None = None, merge: bool = True, tolerance: float | None = None) -> dict:
    """Export a run; with `merge`, the adapter folded into a full-precision base, verified by logits."""
    from .merge import TOLERANCE, merge_run

    if not merge:
        raise UserError(f"{run}: nothing to export; ask for --merge")
    results: dict = {}
    if merge:
        results["merged"] = merge_run(run, Path(out) / "merged" if out else None, tolerance or TOLERANCE).as_dict()
    return results


__all__ = ["export"]
