"""Progress lines for long work (step, loss, tokens/s, ETA) and the metrics JSONL file."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A bar redrawn in place on a terminal, plain lines elsewhere (CI logs)."""

    def __init__(self, total: int, label: str = "train", stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.start = time.perf_counter()
        self.tty = stream.isatty()

    def update(self, done: int, **fields) -> None:
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done) if done else 0.0
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()]
        text = " | ".join([f"{self.label} {done}/{self.total}", *parts, f"{_clock(elapsed)} elapsed", f"ETA {_clock(eta)}"])
        if self.tty:
            width = 20
            filled = int(width * done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\033[K")
            if done >= self.total:
                self.stream.write("\n")
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class MetricLog:
    """Appends one JSON object per record to metrics.jsonl; flushed at once so a crash loses nothing."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handle = open(path, "a", encoding="utf-8")

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
