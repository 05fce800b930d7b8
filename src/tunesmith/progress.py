"""Progress of long work (training steps, evaluation, generation): done/total, rates, ETA.

On a terminal a tqdm bar redrawn in place; elsewhere (CI logs, the dashboard's train.log) one
plain line per update, which reads well in a file. Time inside `paused()` (an evaluation in the
middle of training) counts neither in the elapsed time nor in the rates; such work still to come
(`expect`) counts in the ETA, which is when the work ends. Where items differ in
size (eval batches go from the shortest to the longest), `work` gives each item's size and the
ETA follows the work done, not the count.
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time


def say(text: str) -> None:
    """A line for the person watching: stderr, so stdout keeps only a command's result."""
    print(text, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    def __init__(self, total: int, label: str = "train", stream=None, quiet: bool = False, unit: str = "it",
                 work: list[float] | None = None, work_unit: str = "token"):
        # sys.stderr is looked up now, not at import: it may have been replaced (and closed) since.
        self.total, self.label, self.quiet = total, label, quiet  # quiet: ranks other than 0
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.excluded = 0.0  # seconds spent in paused()
        self.done = 0
        # work done after each item: [0, w0, w0 + w1, ...]; None: every item counts the same
        self.work = None if work is None else [0.0, *itertools.accumulate(float(w) for w in work)]
        self.later, self.later_what = 0.0, ""  # other work still to come (evaluations): expect()
        self.bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm

            # with sizes, the bar counts the work (its rate is then tokens/s) so that its ETA follows it
            self.bar = tqdm(total=total if work is None else self.work[-1], desc=label,
                            unit=unit if work is None else work_unit, unit_scale=work is not None,
                            file=self.stream, dynamic_ncols=True, leave=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def update(self, done: int, **fields) -> None:
        if self.quiet:
            return
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in fields.items()}
        if self.bar is not None:
            if self.later >= 1:  # tqdm's own ETA cannot count it: shown beside it
                shown[f"then {self.later_what}"] = clock(self.later)
            self.bar.update(self.share(done) - self.share(self.done) if self.work else done - self.done)
            self.bar.set_postfix(shown, refresh=True)
            self.done = done
            if done >= self.total:
                self.close()
            return
        self.done = done
        elapsed = self.elapsed()
        whole = self.share(self.total)
        fraction = self.share(done) / whole if whole else 0.0
        eta = (elapsed * (1 - fraction) / fraction if fraction else 0.0) + self.later
        parts = [f"{k} {v}" for k, v in shown.items()]
        later = f" ({clock(self.later)} of it {self.later_what})" if self.later >= 1 else ""
        text = " | ".join([f"{self.label} {done}/{self.total}", *parts, f"{clock(elapsed)} elapsed", f"ETA {clock(eta)}{later}"])
        self.stream.write(text + "\n")
        self.stream.flush()

    def expect(self, seconds: float, what: str) -> None:
        """Work still to come that is not this progress's own (evaluations between training steps):
        the ETA counts it, though the elapsed time and rates leave it out."""
        self.later, self.later_what = max(0.0, seconds), what

    def share(self, done: int) -> float:
        """The work of the first `done` items."""
        done = max(0, min(done, self.total))
        return self.work[done] if self.work else float(done)

    def note(self, text: str) -> None:
        """A line between updates (on a terminal printed above the bar, which stays whole)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            say(text)

    @contextlib.contextmanager
    def paused(self):
        """Work that is not this progress's (its own progress may show meanwhile)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - began
            if self.bar is not None:
                self.bar.start_t += time.perf_counter() - began  # tqdm's rate and ETA leave it out too

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
