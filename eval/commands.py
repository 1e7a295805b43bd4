"""Run `negablate` sub-commands (discovery, controls, model fetch) as child processes.

Discovery and the perplexity-matched search start their own offline vLLM
engines; in a child process their memory and threads are gone when the step
ends, and the harness itself stays free of torch and vLLM.

Each child runs in its own process group, and the whole group goes when the step
ends, however it ends (:func:`server.processes.stop_process_group`): its engine core
and worker are grandchildren, which outlived a child killed on its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from server.processes import stop_process_group

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
            stop_process_group(proc)
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")

