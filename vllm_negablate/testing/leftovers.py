"""What an engine a test started must not leave behind: processes and /dev/shm segments.

vLLM's workers share memory through ``/dev/shm``: the message queues' ``psm_*`` (up
to 240 MiB) and, where the loaded CPU build has it (``_C`` and ``_C_AVX512``, not
``_C_AVX2``), the CPU communicator's ``*-cpushm_N`` (4 MiB each).
Workers unlink them when they exit normally; killed workers cannot. Every Ray run
kills its workers (``RayExecutorV2.shutdown`` ``ray.kill``s its actors), and so does
an ``mp`` run whose engine core misses its 5 s shutdown grace on a loaded machine.
:class:`Leftovers` checks that the test's processes are gone and removes exactly the
segments they used, once no process uses them.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import psutil

__all__ = ["Leftovers"]

SHM = Path("/dev/shm")


class Leftovers:
    """What an engine (or Ray cluster) started by a test must not leave behind.

    :meth:`record` (call it while the engine runs) notes every process under
    ``root`` and the ``/dev/shm`` segments they map or hold open; :meth:`check`
    (after the cluster stopped) fails if any of those processes still runs, then
    removes the noted segments no process uses any more, with a warning naming them.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.processes: dict[int, float] = {}  # pid -> create time (a reused pid is not ours)
        self.cmdlines: dict[int, str] = {}
        self.segments: set[str] = set()

    def record(self) -> None:
        for proc in psutil.Process(self.root).children(recursive=True):
            try:
                cmdline = " ".join(proc.cmdline())
                if "multiprocessing.resource_tracker" in cmdline:  # lives as long as pytest
                    continue
                self.processes[proc.pid] = proc.create_time()
                self.cmdlines[proc.pid] = cmdline
                self.segments |= _segments_used_by([proc.pid])
            except psutil.Error:  # exited meanwhile
                pass

    def _alive(self) -> list[str]:
        alive = []
        for pid, created in self.processes.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid}: {' '.join(proc.cmdline())[:200]}")
            except psutil.Error:
                pass
        return alive

    def check(self, seconds: float = 60.0) -> None:
        assert self.processes, "record() saw no process: the check would prove nothing"
        assert any("cpushm" in n or n.startswith("psm_") for n in self.segments), (
            f"record() saw none of the workers' segments: the clean-up would prove nothing ({self.segments})")
        deadline = time.monotonic() + seconds
        while (alive := self._alive()) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not alive, f"processes left running: {alive}"
        in_use = _segments_used_by(int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
        leaked = sorted(n for n in self.segments - in_use if (SHM / n).exists())
        for name in leaked:
            (SHM / name).unlink(missing_ok=True)
        if leaked:  # vLLM's (see the module docstring), not the plugin's: reported, not failed
            warnings.warn(f"removed {len(leaked)} /dev/shm segments vLLM's workers left: {leaked}",
                          stacklevel=2)


def _segments_used_by(pids: Iterable[int]) -> set[str]:
    """Names of the /dev/shm files these processes map or hold open (unreadable: skipped)."""
    found: set[str] = set()
    for pid in pids:
        proc = Path("/proc") / str(pid)
        try:
            # a maps line ends with the mapped file's path, if any: "... 00:1a 123  /dev/shm/x"
            paths = [line[line.index("/"):] for line in (proc / "maps").read_text().splitlines()
                     if "/" in line]
            paths += [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # exited, or not ours to read
            continue
        found |= {p.strip().removeprefix(f"{SHM}/").removesuffix(" (deleted)") for p in paths
                  if p.strip().startswith(f"{SHM}/")}
    return found
