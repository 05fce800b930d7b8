"""One writer per run folder: the training process holds an exclusive lock on RUN/.lock for its life."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"{folder}: another tunesmith process is training in this run folder") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def holder(folder: Path) -> int | None:
    path = Path(folder) / LOCK_FILE
    if not path.exists():
        return None
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            text = handle.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None
