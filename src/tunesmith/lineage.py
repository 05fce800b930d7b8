"""What a run started from another run (`model: runs/sft`) trained on, and the check that it is still there.

The new run's config.yaml and adapter name their base by path (RUN/export/merged, or RUN/model for
a full fine-tune), and that folder changes when RUN is trained again: the new run would be loaded onto
another model without a word. So the new run keeps RECORD: the earlier run, the folder it trained on,
and a fingerprint of the earlier run's trained weights, which that folder is (or is merged from).
Every later use of the new run's weights (runs.RunFolder.trained: eval, compare, chat, export, a start
from it) and every resume compares the record with the earlier run as it is now.

The fingerprint is each weights file's size, modification time (ns) and a hash of its safetensors
header: a stat and one small read per file, cheap for a full fine-tune of tens of GB too. Training
again rewrites the files (a new time even where the shapes, and so size and header, stay). The merged
copy itself is not fingerprinted: `tunesmith export --format hf` writes it again from the same adapter,
which changes nothing the new run depends on.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import UserError
from .methods import ADAPTER_DIR, MODEL_DIR

RECORD = "started_from.json"
HEADER_LIMIT = 100 * 2**20  # safetensors' own cap on a header's size


def weights_fingerprint(run: Path) -> dict | None:
    """{'adapter/adapter_model.safetensors': [size, mtime_ns, header sha256], ...} of a run's trained
    weights (adapter/ or model/), or None where it has none."""
    for name in (ADAPTER_DIR, MODEL_DIR):
        if (run / name).is_dir():
            return {f"{name}/{path.name}": file_fingerprint(path) for path in sorted((run / name).glob("*.safetensors"))}
    return None


def file_fingerprint(path: Path) -> list:
    stat = path.stat()
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = handle.read(min(size, HEADER_LIMIT))
    return [stat.st_size, stat.st_mtime_ns, hashlib.sha256(header).hexdigest()[:16]]


def check_base(run: Path, merged: bool = True) -> None:
    """Refuse a run whose starting run's model is no longer what it trained on (a run without RECORD,
    started from a model or written before the record existed, passes as before). `merged` False:
    the merge itself may be gone (a resume merges the unchanged adapter again before it trains)."""
    try:
        record = json.loads((run / RECORD).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict) or not {"run", "model", "weights"} <= record.keys():
        raise UserError(f"{run / RECORD}: damaged (not the record of the run {run} started from); restore it, "
                        "or train the run again")
    source, model = Path(record["run"]), Path(record["model"])
    now = weights_fingerprint(source) if (source / "config.yaml").is_file() else None
    if now != record["weights"]:
        what = "is no longer there" if now is None else "was trained again since"
        raise UserError(f"{run}: trained on the model of run {source} ({model}), which {what}; train {run} again "
                        f"(model: {source}, output.overwrite=true), or restore {source} as it was (with its files' "
                        "times: cp -a)")
    if merged and not (model / "config.json").is_file():  # its merge removed; the adapter it was made from is unchanged
        raise UserError(f"{run}: trained on {model} (run {source}'s adapter merged into its base), which is no "
                        f"longer there; `tunesmith export {source} --format hf` writes it again")
