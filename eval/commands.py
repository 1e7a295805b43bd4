"""Run `negablate` sub-commands (discovery, controls, model fetch) as child processes.

Discovery and the perplexity-matched search start their own offline vLLM
engines; in a child process their memory and threads are gone when the step
ends, and the harness itself stays free of torch and vLLM.
"""

from __future__ import annotations

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
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode(errors="replace")
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
