"""eval.progress_log: the plain progress lines a background run writes to its log."""

import io

from rich.console import Console

from eval.progress_log import ProgressLog, format_duration


class _Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _log(terminal=False):
    out = io.StringIO()
    clock = _Clock()
    console = Console(file=out, force_terminal=terminal, width=200)
    return ProgressLog(console, every_s=60, clock=clock), clock, out


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 89, 91, 3599, 5370, 7500)] == [
        "0 s", "89 s", "2 min", "60 min", "1 h 30 min", "2 h 05 min"]


def test_lines_every_minute_with_the_rate_since_the_last_line():
    log, clock, out = _log()
    log.start("random-negative-top1: blimp", 134_000)
    log.advance(100_000)  # a resumed step: answered from the cache at once, no line yet
    clock.t += 30
    log.advance(1_000)
    assert out.getvalue() == ""
    clock.t += 30  # 60 s since start: first line, rate over the whole minute
    log.advance(1_400)
    first = out.getvalue().splitlines()
    assert len(first) == 1 and first[0].endswith(
        "random-negative-top1: blimp: 102,400/134,000 (76%), 1,706.7/s, about 19 s left")
    clock.t += 60  # the next line's rate counts only what came since the first
    log.advance(2_400)
    second = out.getvalue().splitlines()[1]
    assert second.endswith("104,800/134,000 (78%), 40.0/s, about 12 min left")
    clock.t += 10
    log.advance(29_200)
    log.finish()
    assert out.getvalue().splitlines()[2].endswith("134,000/134,000 (100%) in 2 min")


def test_silent_on_a_terminal():
    log, clock, out = _log(terminal=True)
    log.start("x", 10)
    clock.t += 120
    log.advance(5)
    log.finish()
    assert out.getvalue() == ""
