"""Progress of the trainers (main process only): a tqdm bar on a terminal, periodic one-line
status reports otherwise (CI logs, ``nohup``, ``| tee``), and the report lines between them."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

# Without a terminal: a status line at every STATUS_FRACTION of the total (a bar over a whole run,
# e.g. the search), or after STATUS_SECONDS without one, whichever comes first. A bar over one epoch
# prints only the time-based lines: the epoch's own report line follows it anyway, so a 60-epoch run
# of short epochs writes 60 lines, not 600; an epoch long enough to need news gets a line per 30 s.
STATUS_FRACTION = 0.1
STATUS_SECONDS = 30.0


class StatusLines:
    """The subset of tqdm's interface the trainers use, printing whole lines instead of redrawing
    one with carriage returns (thousands of which would fill a log file)."""

    def __init__(self, total: int, initial: int = 0, desc: str | None = None, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, fraction: float | None = STATUS_FRACTION) -> None:
        self.total, self.n, self.desc, self.fraction = total, initial, desc or "", fraction
        self.stream, self.clock = stream or sys.stderr, clock
        self.postfix: dict[str, Any] = {}
        self._started = self._last_time = clock()
        self._first = initial
        self._next = self._next_mark(initial)

    def _next_mark(self, n: int) -> float:
        if self.fraction is None:
            return float("inf")
        step = max(1, round(self.total * self.fraction))
        return (n // step + 1) * step

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, **values: Any) -> None:
        self.postfix = {**(ordered_dict or {}), **values}

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        at_mark = self.n >= min(self._next, self.total) if self.fraction is not None else False
        if at_mark or now - self._last_time >= STATUS_SECONDS:
            self._print(now)

    def _print(self, now: float) -> None:
        self._next, self._last_time = self._next_mark(self.n), now
        elapsed = now - self._started
        rate = (self.n - self._first) / elapsed if elapsed > 0 else 0.0
        shown = f"{100.0 * self.n / self.total:3.0f}%" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        prefix = f"{self.desc}: " if self.desc else ""
        print(f"{prefix}{self.n}/{self.total} {shown}{extra} [{elapsed:.0f} s, {rate:.3g} it/s]",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


def progress_bar(enabled: bool, total: int, initial: int = 0, desc: str | None = None, *,
                 fraction: float | None = STATUS_FRACTION):
    """A tqdm bar on a terminal, :class:`StatusLines` otherwise (a line every ``fraction`` of
    ``total``, None: only after quiet spells), or None when disabled (non-main processes,
    ``--no-progress``)."""
    if not enabled:
        return None
    if not sys.stderr.isatty():
        return StatusLines(total, initial, desc, fraction=fraction)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)


def report(line: str, enabled: bool) -> None:
    """Prints a line without breaking a running bar."""
    if enabled:
        say(line)


def say(line: str) -> None:
    """Prints a line on stdout without breaking a running bar (whatever ``--progress`` says)."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()
