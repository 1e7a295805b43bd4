"""Child processes that lead their own process group, and how to end all of them.

Light on purpose (the standard library only): the harness (:mod:`eval.commands`)
uses it without importing torch or vLLM, and the server launcher uses it too.
"""

from __future__ import annotations

import os
import signal
import subprocess

__all__ = ["stop_process_group"]


def stop_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """End ``proc`` and everything in its process group (it must lead one:
    ``start_new_session=True``): SIGTERM, ``grace_s`` for a clean exit, then SIGKILL.

    Also after ``proc`` exited by itself, for what it left behind: a vLLM engine core
    and its worker are grandchildren, and a parent killed on its own (a timeout's
    SIGKILL) left them running, bound to the cores the next engine gets (seen: a
    test's timed-out search kept its worker spinning on both cores for minutes).
    """
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
