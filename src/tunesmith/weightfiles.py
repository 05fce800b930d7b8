"""The weight files of a run's adapter/ or model/ folder (or an adapter folder), checked before anything
loads them: a file cut short or missing is one line naming it, not a loader's traceback."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError


def readable_weights(folder: Path) -> None:
    """Each safetensors file of a folder reads whole (its header, and data to the end its header
    names): a file cut short (a full disk, a copy interrupted) is said here, before anything loads
    it or, for `push`, before a hub repo is made for it."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = read_json(folder / "model.safetensors.index.json")  # a sharded model: each shard it names
    shards = index.get("weight_map") if isinstance(index, dict) else None
    named = {str(name) for name in shards.values()} if isinstance(shards, dict) else set()
    missing = sorted(named - {path.name for path in files})
    # An adapter folder saved by older peft (or safe_serialization=False) holds adapter_model.bin
    if missing or not (files or any(folder.glob("*.bin"))):
        what = f"weights missing ({', '.join(missing[:3])})" if missing else "no weights (no .safetensors file)"
        raise UserError(f"{folder}: {what}; train the run again, or restore the file")
    for path in files:
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: damaged weights ({str(err).splitlines()[0][:160]}); train the run again, or "
                            "restore the file") from None


def read_json(path: Path):
    """A JSON file's value, or None when it is missing or not (yet) valid JSON (here, below runs.py,
    which reads run files with it: the index of a sharded model is one)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # RecursionError: nesting past Python's stack
        return None
