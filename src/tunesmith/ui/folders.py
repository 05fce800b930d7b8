"""What the dashboard shows, read only from the run folders the CLI writes (through RunFolder, the
one owner of their layout), so both always agree."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import yaml

from .. import runlock
from ..errors import UserError
from ..runs import RunFolder, read_json, read_jsonl

LOG_FILE = "train.log"
# Files other features may add to a run folder; shown when present, never required.
REPORT_FILES = ("report.html", "report.json")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def inside(root: Path, relative: str) -> Path:
    """`root/relative`, resolved (symlinks followed); refused when it leaves `root`."""
    base = root.resolve()
    if not relative or "\x00" in relative or os.path.isabs(relative):
        raise UserError(f"{relative!r}: not a path inside {base}")
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{relative!r}: outside {base}")
    return target


def run_folder(runs_dir: Path, name: str) -> Path:
    """The folder of run `name`: a direct child of the runs folder holding a config.yaml."""
    folder = inside(runs_dir, name)
    if folder.parent != runs_dir.resolve() or not is_run(folder):
        raise LookupError(f"no run named {name!r}")
    return folder


def is_run(folder: Path) -> bool:
    """A folder with a config.yaml and no symbolic link among its files: tunesmith makes none, and one
    could show (or, resumed, have training write) a file outside the runs folder."""
    try:
        return (folder / "config.yaml").is_file() and not any(entry.is_symlink() for entry in folder.iterdir())
    except OSError:
        return False


def read_config(folder: Path) -> dict:
    """A run's config.yaml as sections of settings ({} where unreadable); `model: NAME` as {name: NAME}.
    A run folder may come from elsewhere: YAML aliases are refused (a few hundred bytes of nested
    aliases expand to gigabytes once sent as JSON), and anything that is not a section is left out."""
    try:
        text = (folder / "config.yaml").read_text(encoding="utf-8")
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            return {}
        raw = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    if not isinstance(raw, dict):
        return {}
    if isinstance(raw.get("model"), str):
        raw["model"] = {"name": raw["model"]}
    return {key: value for key, value in raw.items() if isinstance(value, dict)}


def read_metrics(folder: Path) -> list[dict]:
    """Records of metrics.jsonl; a line still being written (or cut by a crash) is left out."""
    return RunFolder(folder).records()


def training_pid(folder: Path) -> int | None:
    """The pid of the process training this run (0: one is starting), None when none is: read from
    the run folder's lock (runlock.py), which a process holds exactly as long as it lives, however
    the run was started; a pid file could name a process that has ended, or another that got its number."""
    return runlock.holder(folder)


def checkpoints(folder: Path) -> list[str]:
    return [p.name for p in RunFolder(folder).checkpoint_folders()]


def status(folder: Path) -> str:
    """finished / running / stopped (resumable) / failed / pending: only what the folder holds says which."""
    return RunFolder(folder).status()


def section(mapping, key: str) -> dict:
    """mapping[key] where both are mappings, else {}: a run folder from elsewhere may hold anything."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    return value if isinstance(value, dict) else {}


def best_eval(records: list[dict], results: dict | None) -> float | None:
    values = [r["eval_loss"] for r in records if r.get("event") == "eval" and isinstance(r.get("eval_loss"), (int, float))]
    tuned = section(results, "fine_tuned").get("eval_loss")
    if isinstance(tuned, (int, float)):
        values.append(tuned)
    return min(values) if values else None


def model_label(model: str) -> str:
    """A run's base as the list shows it: a folder by its name, an earlier run's model as that run
    (its config names RUN/export/merged or RUN/model: it read as 'merged')."""
    from ..start import source_run

    if os.sep not in model:
        return model  # a hub id
    source = source_run(model)
    return f"run {source.name}" if source else Path(model).name


def summary(folder: Path) -> dict:
    """One row of the run list."""
    config = read_config(folder)
    records = read_metrics(folder)
    results = RunFolder(folder).read_results()
    train_records = [r for r in records if r.get("event") == "train" and isinstance(r.get("step"), int)]
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))]
    started = (folder / "config.yaml").stat().st_mtime
    model = str(config.get("model", {}).get("name", "?"))
    data = str(config.get("data", {}).get("train", "?"))
    method = config.get("adapter", {}).get("method", "?")
    objective = config.get("train", {}).get("objective", "sft")
    return {
        "name": folder.name,
        "status": status(folder),
        "model": model_label(model),
        "method": method if objective == "sft" else f"{method}, {objective}",  # a DPO run's LoRA: "lora, dpo"
        "data": Path(data).name if os.sep in data else data,
        "best_eval": best_eval(records, results),
        "step": train_records[-1]["step"] if train_records else 0,
        "max_steps": config.get("train", {}).get("max_steps"),
        "last_loss": train_records[-1].get("loss") if train_records else None,
        "started": started,
        "updated": max(times) if times else started,
        "seconds": (results or {}).get("train_seconds") or ((max(times) - min(times)) if len(times) > 1 else None),
    }


def list_runs(runs_dir: Path) -> list[dict]:
    """Every run folder directly under the runs folder, newest first."""
    if not runs_dir.is_dir():
        return []
    root = runs_dir.resolve()
    # A symlink leading out of the runs folder is not a run here (run_folder refuses it too).
    runs = [listed(child) for child in runs_dir.iterdir()
            if child.is_dir() and child.resolve().parent == root and is_run(child)]
    return sorted(runs, key=lambda run: run["started"], reverse=True)


def listed(folder: Path) -> dict:
    """A run's row; one whose files cannot be read is listed as such, never hiding the others."""
    try:
        return summary(folder)
    except Exception as err:  # anything a damaged or foreign folder holds
        error = f"{type(err).__name__}: {str(err)[:200]}"
        return {"name": folder.name, "status": "unreadable", "error": error, "model": "?", "method": "?",
                "data": error, "step": 0, "started": 0.0}


def predictions(folder: Path, limit: int = 20) -> list[dict]:
    """Test examples with the fine-tuned and (when scored) the base model's answers side by side."""
    run = RunFolder(folder)
    tuned = read_jsonl(run.predictions(), limit)
    base = read_jsonl(run.predictions("base"), limit)
    rows = []
    for index, row in enumerate(tuned or base):
        rows.append({"prompt": row.get("prompt"), "reference": row.get("reference"),
                     "fine_tuned": tuned[index].get("answer") if index < len(tuned) else None,
                     "base": base[index].get("answer") if index < len(base) else None})
    return rows


def log_tail(folder: Path, lines: int = 30) -> str:
    try:
        with open(folder / LOG_FILE, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    # Progress bars redraw with carriage returns: keep what the terminal would show last.
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:])


def detail(folder: Path) -> dict:
    """Everything the run page shows."""
    results = read_json(folder / "results.json")
    return {
        **summary(folder),
        "config": read_config(folder),
        "config_text": (folder / "config.yaml").read_text(encoding="utf-8", errors="replace"),
        "results": results,
        "data_check": section(results, "data") or None,
        "predictions": predictions(folder),
        "checkpoints": checkpoints(folder),
        "reports": [name for name in REPORT_FILES if (folder / name).is_file()],
        "log": log_tail(folder),
        "now": time.time(),
    }
