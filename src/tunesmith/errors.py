"""Errors a user can fix. The CLI prints them as one line and exits with status 2."""
import os
import sys


class UserError(Exception):
    """A mistake in the user's config, paths or data: shown without a traceback."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived during training: the step was finished and a checkpoint written."""

    def __init__(self, signum: int, saved=None):
        super().__init__(f"stopped by signal {signum}; checkpoint {saved}")
        self.signum, self.saved = signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def tell(self) -> None:
        """Where the checkpoint went, said once: by rank 0 alone under torchrun."""
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped by signal {self.signum}; checkpoint saved: {self.saved}; resume with the same command",
                  file=sys.stderr)


class Terminated(BaseException):
    """SIGTERM outside training's steps (loading, scoring). A BaseException, as KeyboardInterrupt is:
    no `except Exception` on the way (a checkpoint's damage check, a scorer's retry) may take it for
    a failure of its own."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def stop_on_sigterm() -> None:
    """SIGTERM (the dashboard's Stop, a scheduler's) raises Terminated, so a command stopped while it
    loads or scores says so instead of vanishing; training's loop defers it to a step's end. Not in
    torchrun's ranks: one waiting in a collective (C code) would not see a Python handler, and
    torchrun's SIGTERM would then wait out its grace period instead of ending it."""
    import signal

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return

    def stop(signum, frame):
        raise Terminated(signum)
    try:
        signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals stay as they are
        pass


def counted(count: int, noun: str) -> str:
    """'1 problem', '2 problems'."""
    return f"{count} {noun}{'s' * (count != 1)}"


def closest(name: str, choices) -> str | None:
    """The valid name most like `name`, for 'did you mean' hints."""
    import difflib

    choices = list(choices)
    # A key the name starts with ('lr' for 'lr_rate') beats one that merely shares letters.
    prefixed = [c for c in choices if name.startswith(c) or c.startswith(name)]
    if prefixed:
        return max(prefixed, key=lambda c: difflib.SequenceMatcher(None, name, c).ratio())
    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return found[0] if found else None


def plain_warnings(debug: bool = False) -> None:
    """tunesmith's own warnings printed as one 'warning: ...' line: the default format adds the
    file and source line that warned, which reads like a fault. Others' warnings keep it, and
    with --debug all do."""
    import os
    import warnings

    if debug or getattr(warnings.formatwarning, "plain", False):
        return
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    default = warnings.formatwarning

    def format_warning(message, category, filename, lineno, line=None):
        if os.path.abspath(filename).startswith(package):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    format_warning.plain = True
    warnings.formatwarning = format_warning


def one_line(err: Exception) -> str:
    """What the command line says of a UserError, or of an OSError (the file and the system's reason)."""
    if isinstance(err, OSError) and err.filename is not None:
        return f"{err.filename}: {err.strerror or err}"
    return str(err)
