"""One writer per run folder: an exclusive `flock` on RUN/.lock, held by the training process for its whole life.

The lock, not a pid file, says whether a run is running. The kernel drops it when its holder ends,
however it ends (SIGKILL included), so a stale pid whose number the system has given to another
process never passes for a live run, and a second trainer (a second terminal, a second Resume
click) is refused with a message instead of writing the same checkpoints.

The holder writes its pid into the lock file; that pid is believed only while the lock is held.
The holder removes the file as it leaves (and the folder, where it made it and nothing else was
written): a run that fails early leaves no trace, not even in an earlier run's folder. A process
that opened the file before it was removed sees, once it has the lock, that the file is no
longer the folder's and opens it again, so two holders never coexist.
The dashboard takes the lock before it starts a trainer and hands it to the child (`handover`):
the child inherits the locked file, adopts it in `hold`, and the run shows as running from the
moment it is started. Linux and macOS (fcntl); a forked (not exec'd) child of the trainer shares
the lock, as every flock holder's does.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

LOCK_FILE = ".lock"
INHERITED = "TUNESMITH_RUN_LOCK_FD"  # the descriptor of a lock handed over by the dashboard
# holder() takes a shared lock for an instant to look; a trainer starting in that instant retries this long.
PROBE_GRACE_SECONDS = 1.0


@contextlib.contextmanager
def hold(folder: str | Path) -> Iterator[None]:
    """Hold the run folder's lock for the body (creating the folder); UserError naming the folder and
    the holder's pid when another process holds it."""
    folder = Path(folder)
    made_folder = not folder.exists()
    fd = _adopt(folder)
    if fd is None:
        fd = _take(folder)
    try:
        _write_pid(fd, os.getpid())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(folder / LOCK_FILE)  # while still held: see the module's docstring
        os.close(fd)  # releases the lock
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty: a run that wrote nothing


@contextlib.contextmanager
def handover(folder: str | Path) -> Iterator[int]:
    """The lock taken here, as a descriptor to pass to the child process that will train
    (subprocess pass_fds, with `INHERITED` in its environment); it stays held as long as the child
    keeps it, also after this side's copy is closed. Write the child's pid with `record`."""
    fd = _take(Path(folder))
    try:
        yield fd
    finally:
        os.close(fd)


def record(fd: int, pid: int) -> None:
    """Write `pid` as the holder's into a lock file held through `fd`."""
    _write_pid(fd, pid)


def holder(folder: str | Path) -> int | None:
    """The pid of the process holding the run folder's lock, None when none does (the lock is tested,
    not kept). 0 when it is held but the pid is not written yet (a trainer in its first instant)."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:  # none, or a symbolic link: whatever holds its target is not this run
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _take(folder: Path) -> int:
    deadline = time.monotonic() + PROBE_GRACE_SECONDS
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        refuse_links(folder)
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except FileNotFoundError:  # the folder was removed by a holder leaving it empty: make it again
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            if time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            who = f"pid {pid}" if pid else "a process starting now"
            raise UserError(f"{folder}: another training process ({who}) is writing this run folder; wait for it to "
                            "finish or stop it (the dashboard's Stop, or SIGTERM) before starting a second one") from None
        if _is_the_folders(fd, folder):
            os.ftruncate(fd, 0)  # the pid of an earlier holder is stale from this instant on
            return fd
        os.close(fd)  # locked a file its last holder removed as it left: open the folder's own


def refuse_links(folder: Path, why: str = "tunesmith writes only its own files there, never through links") -> None:
    """A run folder tunesmith is about to write (or upload) holds no symbolic link: a shared or
    downloaded run folder could otherwise point its .lock, train.log or metrics.jsonl at any file of
    the user's, which training would then overwrite or append to (or push upload)."""
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            if os.path.islink(os.path.join(root, name)):
                raise UserError(f"{os.path.join(root, name)}: a symbolic link in a run folder; {why}. "
                                "Remove it (or copy what it points to) first")


def _is_the_folders(fd: int, folder: Path) -> bool:
    try:
        ours, current = os.fstat(fd), os.lstat(folder / LOCK_FILE)
    except OSError:
        return False
    return stat.S_ISREG(current.st_mode) and (ours.st_dev, ours.st_ino) == (current.st_dev, current.st_ino)


def _adopt(folder: Path) -> int | None:
    """The lock the dashboard handed to this process, when it is this folder's (else None)."""
    value = os.environ.pop(INHERITED, None)
    if value is None or not value.isdigit():
        return None
    fd = int(value)
    try:
        if not _is_the_folders(fd, folder):
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # already ours: this only confirms it
    except OSError:
        return None
    os.set_inheritable(fd, False)  # programs this trainer runs do not get it
    return fd


PID_WIDTH = 20  # every pid written padded to this width: one write replaces the last whole


def _write_pid(fd: int, pid: int) -> None:
    # one write, no truncation first: a reader between the two (holder(), the dashboard) read no pid
    os.pwrite(fd, str(pid).ljust(PID_WIDTH).encode(), 0)


def _read_pid(fd: int) -> int:
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else 0
