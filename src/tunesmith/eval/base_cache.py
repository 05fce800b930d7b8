"""The base model's scores of a run, kept in its folder: a run resumed from a checkpoint (stopped,
crashed, or ended early and taken further) does not generate the base's answers and probe again,
which on a CPU can take as long as the training itself.

Each part is kept under a fingerprint of everything that decides it: the model and its files, the
method (QLoRA scores a quantised base), the dtype and device, the data and chat template, the
evaluation settings, the scorer's source, the prompts themselves. Any change, and the part is scored
again; a file that does not read back is ignored."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import sys
from importlib.machinery import PathFinder
from pathlib import Path

from ..progress import say
from ..runs import read_json, write_json
from .compare import Scored


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def model_files(name: str) -> list | str:
    """A local model's files by name, size and modification time (weights replaced in place count
    as another model); a hub id by the snapshot of it in the hub cache (a newer download is another
    model); `default` by its name."""
    folder = Path(name).expanduser()
    if not folder.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(name, "config.json")
        except Exception:  # not a hub id (`default`), or no hub library: the name alone
            found = None
        return str(Path(found).parent) if isinstance(found, str) else name  # .../snapshots/<commit>
    files = sorted(folder.rglob("*")) if folder.is_dir() else [folder]
    return [(str(p.relative_to(folder)) if folder.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns)
            for p in files if p.is_file()]


def template(setting: str | None) -> str | None:
    """data.chat_template's text (a .jinja file edited between the first start and a resume renders
    other prompts), as the data cache keys it."""
    from ..data.templates import template_text

    try:
        return template_text(setting) if setting else None
    except Exception:  # a file gone: the setting as written (training itself says what is wrong)
        return setting


def scorer_source(spec: str | None) -> str | None:
    """The scorer module's source, hashed (an edited scorer scores differently), found as load_scorer
    finds it (a .py file, or a module on the path or next to the data) without importing anything;
    "" where it is not found so: then nothing is kept."""
    if not spec:
        return None
    name = spec.partition(":")[0]
    if name.endswith(".py"):
        origin = name
    else:
        found, where = None, [*sys.path, ""]  # load_scorer adds "" (the current folder) last
        parts = name.split(".")
        for depth in range(len(parts)):  # a package's folder, then its module: found, never run
            found = PathFinder.find_spec(".".join(parts[:depth + 1]), where) if where is not None else None
            where = found.submodule_search_locations if found is not None else None
        origin = getattr(found, "origin", None)
    if not origin or not Path(origin).is_file():
        return ""
    return hashlib.sha256(Path(origin).read_bytes()).hexdigest()


def model_key(cfg, dtype, device) -> list:
    """What decides the base's outputs: the model, how it is loaded and run."""
    return [importlib.metadata.version("tunesmith"), cfg.model.model_dump(mode="json"), model_files(cfg.model.name),
            cfg.adapter.model_dump(mode="json"), cfg.train.fast_paths, str(dtype), device.type]


def rows_key(cfg, dtype, device, prompts, pool, layout: str) -> str | None:
    """The fingerprint of the base rows on the test split (None: not kept, the scorer not found)."""
    source = scorer_source(cfg.eval.scorer)
    if source == "":
        return None
    prompted = cfg.eval.kshot or cfg.eval.retrieval_k  # the training pool matters only to those rows
    return fingerprint(model_key(cfg, dtype, device), cfg.data.model_dump(mode="json"),
                       template(cfg.data.chat_template),
                       cfg.eval.model_dump(mode="json"), source, layout, prompts, pool if prompted else None)


# How the probe's items become prompts, where the items themselves stay: 2, HellaSwag's ctx_b capitalised.
PROBE_PROMPTS = 2


def probe_key(cfg, dtype, device, probe: dict) -> str:
    """The fingerprint of the general-ability probe's base half: the model, the items and their prompts."""
    return fingerprint(model_key(cfg, dtype, device), cfg.eval.seed, probe, PROBE_PROMPTS)


class BaseScores:
    """A run folder's base_scores.json: {part: {"key": fingerprint, "value": ...}}; a key of None
    keeps nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        kept = read_json(self.path) if self.path.is_file() else None
        self.kept = kept if isinstance(kept, dict) else {}

    def rows(self, key: str | None, score) -> list[Scored]:
        """The base rows kept under `key`, else score() kept."""
        found = self._get("rows", key)
        try:
            if isinstance(found, list) and found:
                rows = [Scored(**row) for row in found]
                say(f"base rows ({', '.join(r.name for r in rows)}): as scored at this run's first start ({self.path.name})")
                return rows
        except TypeError:  # not rows this version wrote: scored again
            pass
        scored = score()
        self._put("rows", key, [dataclasses.asdict(row) | {"rows": [{k: float(v) for k, v in r.items()} for r in row.rows]}
                                for row in scored])
        return scored

    def probe(self, key: str | None, score) -> dict:
        """The probe's base scores (set -> per-item rows) kept under `key`, else score() kept."""
        found = self._get("probe", key)
        if isinstance(found, dict) and found:
            say(f"general ability of the base: as scored at this run's first start ({self.path.name})")
            return found
        scores = score()
        self._put("probe", key, scores)
        return scores

    def _get(self, part: str, key: str | None):
        entry = self.kept.get(part)
        return entry.get("value") if key is not None and isinstance(entry, dict) and entry.get("key") == key else None

    def _put(self, part: str, key: str | None, value) -> None:
        if key is not None:
            self.kept[part] = {"key": key, "value": value}
            write_json(self.path, self.kept)
