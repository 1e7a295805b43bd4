"""eval.commands.run_logged: a child step's whole process group goes when the step ends."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from eval.commands import run_logged


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Whether ``pid`` has exited (gone, or a zombie waiting for its new parent)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _grandchild_cmd(pidfile: Path, exit_code: int | None) -> list[str]:
    """A child that starts a long-lived grandchild (an engine's stand-in), then exits or waits."""
    tail = "wait" if exit_code is None else f"exit {exit_code}"
    return ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; {tail}"]


def _pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 5
    while not pidfile.is_file() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, "the child never wrote its grandchild's pid"
        time.sleep(0.02)
    return int(pidfile.read_text())


def test_a_failed_step_leaves_nothing_running(tmp_path):
    pidfile = tmp_path / "pid"
    with pytest.raises(RuntimeError, match=r"command failed \(3\)"):
        run_logged(_grandchild_cmd(pidfile, 3), tmp_path / "log")
    assert _gone(_pid(pidfile))


def test_an_interrupted_step_leaves_nothing_running(tmp_path):
    pidfile = tmp_path / "pid"

    def interrupt(signum, frame):
        raise TimeoutError("step timed out")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(TimeoutError):
            run_logged(_grandchild_cmd(pidfile, None), tmp_path / "log")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert _gone(_pid(pidfile))


def test_a_finished_step_writes_its_log(tmp_path):
    run_logged(["sh", "-c", "echo hello"], tmp_path / "log")
    run_logged(["sh", "-c", "echo again"], tmp_path / "log")
    assert (tmp_path / "log").read_text() == "hello\nagain\n"
