"""Run `negablate` sub-commands (discovery, controls, model fetch) as child processes.

Discovery and the perplexity-matched search start their own offline vLLM
engines; in a child process their memory and threads are gone when the step
ends, and the harness itself stays free of torch and vLLM.

Each child runs in its own process group, and the whole group goes when the step
ends, however it ends: the engine core and its worker are grandchildren, and a
child killed on its own (a timeout's SIGKILL, an interrupt) left them running,
bound to the same cores as the next engine (seen: a test's timed-out search kept
its worker spinning on both cores for minutes, starving the run beside it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)


def negablate_command(*args: str) -> list[str]:
    """``negablate ARGS`` with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "vllm_negablate.cli", *args]


def run_logged(cmd: list[str], log: Path) -> None:
    """Run ``cmd`` with its output appended to ``log``; on failure raise with the log's tail."""
    console.print(f"[dim]$ {' '.join(cmd[2:] if cmd[1] == '-m' else cmd)}  (log: {log})[/dim]")
    with open(log, "ab") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait()
        finally:
            stop_group(proc)
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


def stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End ``proc`` and everything in its process group (it must lead one:
    ``start_new_session=True``): SIGTERM, ``grace_s`` for a clean exit, then SIGKILL.
    Also after ``proc`` exited by itself, for what it left behind."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the group is empty: nothing left behind
        proc.wait()
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
