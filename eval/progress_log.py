"""Progress of a long scoring step as plain log lines, for runs with no terminal.

A progress bar draws nothing when its output is a file (rich switches live displays
off there), so a powered ``negablate reproduce`` started with ``nohup`` said nothing
for an hour at a time. :class:`ProgressLog` writes one line every ``every_s`` seconds
and one when the step ends: how far it is, the rate since the previous line (a resumed
step answers its first sequences from the cache at once, which would make a rate since
the start meaningless), and roughly how long is left: the things one tails a log for.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console

__all__ = ["ProgressLog", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2 h 05 min``: to the precision an estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


class ProgressLog:
    """Plain progress lines for one step at a time (``start``, ``advance``, ``finish``).

    Does nothing when ``console`` is a terminal (the progress bar shows it there).
    ``clock`` is injectable for tests.
    """

    def __init__(self, console: Console, every_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.every_s, self.clock = console, every_s, clock
        self.enabled = not console.is_terminal
        self.label, self.total, self.done = "", 0, 0
        self._t0 = self._last = 0.0
        self._done_last = 0

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.done, self._done_last = label, total, 0, 0
        self._t0 = self._last = self.clock()

    def advance(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if self.enabled and now - self._last >= self.every_s and self.done < self.total:
            self._write(now)

    def finish(self) -> None:
        if self.enabled:
            self._write(self.clock())

    def line(self, now: float) -> str:
        """The line written at ``now``: count, share, then the rate since the previous
        line and the time left, or, once done, the step's time."""
        share = self.done / self.total if self.total else 1.0
        text = f"{time.strftime('%H:%M:%S')} {self.label}: {self.done:,}/{self.total:,} ({100 * share:.0f}%)"
        if self.done >= self.total:
            return text + f" in {format_duration(now - self._t0)}"
        span, count = now - self._last, self.done - self._done_last
        if span > 0 and count > 0:
            rate = count / span
            text += f", {rate:,.1f}/s, about {format_duration((self.total - self.done) / rate)} left"
        return text

    def _write(self, now: float) -> None:
        self.console.print(self.line(now), highlight=False, soft_wrap=True)
        self._last, self._done_last = now, self.done
