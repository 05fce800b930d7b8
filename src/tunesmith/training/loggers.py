"""Metric logging: one small protocol (`write(**record)`, `close()`), like torchtune's MetricLogger.

The JSONL file (the run's record of truth) is always written; TensorBoard, Weights & Biases and
MLflow are added when asked for and installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Protocol

from ..errors import UserError


class MetricLog:
    """Appends one JSON object per record to metrics.jsonl; flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = open(path, "a", encoding="utf-8")
        if self.handle.tell() and not _ends_a_line(path):  # a crash cut the last record: the next starts afresh
            self.handle.write("\n")

    def write(self, **record) -> None:
        record.setdefault("time", round(time.time(), 3))
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint; they are about to be redone."""
        self.handle.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the crash
            if record.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(self.path)
        self.handle = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self.handle.close()


def _ends_a_line(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


class MetricLogger(Protocol):
    """What the training loop needs of a logger: one record per call (with `event` and `step`)."""

    def write(self, **record) -> None: ...

    def close(self) -> None: ...


def numbers(record: dict) -> dict[str, float]:
    """The record's numeric fields named 'event/key' (e.g. 'train/loss'), for dashboards."""
    event = record.get("event", "metric")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLog:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def write(self, **record) -> None:
        for key, value in numbers(record).items():
            self.writer.add_scalar(key, value, global_step=record.get("step", 0))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    def __init__(self, folder: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="tunesmith", name=folder.name, dir=str(folder), config=config)

    def write(self, **record) -> None:
        values = numbers(record)
        if values:
            self.run.log(values, step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


class MLflowLog:
    def __init__(self, folder: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=folder.name)
        try:
            mlflow.log_params({f"{section}.{key}": value for section, values in config.items()
                               if isinstance(values, dict) for key, value in values.items()})
        except BaseException:  # ended, or the next run in this process (curve, choose) finds it active
            mlflow.end_run()
            raise

    def write(self, **record) -> None:
        values = numbers(record)
        if values:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=record.get("step", 0))

    def close(self) -> None:
        self.mlflow.end_run()


# logger name -> (module that must be importable, constructor)
EXTRA_LOGGERS = {
    "tensorboard": ("tensorboard", lambda folder, config: TensorBoardLog(folder / "tensorboard")),
    "wandb": ("wandb", WandbLog),
    "mlflow": ("mlflow", MLflowLog),
}


class Loggers:
    """The JSONL log plus the extra loggers asked for; the loop talks to this one object."""

    def __init__(self, jsonl: MetricLog, extra: list[MetricLogger]):
        self.jsonl, self.extra = jsonl, extra
        self.path = jsonl.path

    def write(self, **record) -> None:
        self.jsonl.write(**record)
        for logger in list(self.extra):
            try:
                logger.write(**record)
            except Exception as err:  # noqa: BLE001 (a dashboard's network or quota error must not stop training)
                self.extra.remove(logger)
                with contextlib.suppress(Exception):
                    logger.close()
                print(f"warning: eval.loggers: {type(logger).__name__} failed ({type(err).__name__}: {err}); it is left "
                      f"out for the rest of the run, and {self.path} keeps every record", file=sys.stderr)

    def truncate_after(self, step: int) -> None:
        self.jsonl.truncate_after(step)  # dashboards keep their history; the file is the record of truth

    def close(self) -> None:
        close_all([self.jsonl, *self.extra])


def close_all(loggers: list) -> None:
    """Close every logger, also when one fails to close; the first failure is raised after."""
    failures = []
    for logger in loggers:
        try:
            logger.close()
        except Exception as err:  # noqa: BLE001 (a logger's own failure must not leave the others open)
            failures.append(err)
    if failures:
        raise failures[0]


def _installed(module: str) -> bool:
    if module in sys.modules:  # already imported (or blocked, as None)
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def open_loggers(run_dir: Path, names: list[str] | None = None, config: dict | None = None) -> Loggers:
    """metrics.jsonl always, plus each named logger; a named one that is not installed is an error."""
    for name in dict.fromkeys(names or []):
        if name not in EXTRA_LOGGERS:
            raise UserError(f"eval.loggers: unknown logger '{name}'; choose from {', '.join(EXTRA_LOGGERS)}")
        if not _installed(EXTRA_LOGGERS[name][0]):
            raise UserError(f"eval.loggers: '{name}' asked for but not installed (pip install {EXTRA_LOGGERS[name][0]})")
    extra: list[MetricLogger] = []
    try:
        for name in dict.fromkeys(names or []):
            extra.append(EXTRA_LOGGERS[name][1](run_dir, config or {}))
        return Loggers(MetricLog(run_dir / "metrics.jsonl"), extra)
    except BaseException:
        with contextlib.suppress(Exception):  # the failure to open is the one to report
            close_all(extra)  # the loggers opened before it
        raise
