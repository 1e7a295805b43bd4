"""Run `negablate serve` as a child process: the one launcher for reproduce, analyses, benches, tests.

A child process, not an in-process app: vLLM's engine owns the process (signals,
CPU binding, spawned workers), and a run that dies must not leave a server
holding the port. So :class:`ServerProcess` starts ``python -m server.app`` in
its own process group on a free loopback port, waits for ``/health``, writes
its output to a log file, and stops the whole group on exit, including when
the parent gets SIGTERM (inside ``with``, on the main thread).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from vllm_negablate import defaults
from vllm_negablate.offline import bind_worker_to_all_cores

from server.processes import stop_process_group

ENV_WORKER_SLOTS = "NEGABLATE_WORKER_SLOTS"
ENV_WORKER_SLOTS_OLD = "NEGABLATE_MAX_SETS"  # the variable's old name, still read


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` so ``finally: server.stop()`` runs.

    The server runs in its own session (so a Ctrl-C in the terminal reaches only the
    parent, which then stops it cleanly); without this a plain ``kill`` of the parent
    skips the ``finally`` and leaves the server holding its port and memory.
    Call it from a script's ``main``; ``with ServerProcess(...)`` does it for you.
    """

    def _exit(signum: int, _frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def worker_slots(max_sets: int) -> int:
    """Worker slot-table size for ``--max-sets N``: a replaced set keeps its old slot
    until its requests end, so the workers need room beyond the resident sets."""
    return 2 * max_sets + 2


def ensure_worker_slots(env: MutableMapping[str, str], max_sets: int) -> None:
    """Give the workers at least :func:`worker_slots` slots; more if ``env`` already asks."""
    asked = next((int(env[k]) for k in (ENV_WORKER_SLOTS, ENV_WORKER_SLOTS_OLD) if env.get(k)), 0)
    env.pop(ENV_WORKER_SLOTS_OLD, None)
    env[ENV_WORKER_SLOTS] = str(max(worker_slots(max_sets), asked))


class ServerProcess:
    """``negablate serve MODEL`` on a free loopback port; ``start()`` returns once healthy.

    ``extra`` are more ``negablate serve`` arguments. ``kv_cache_bytes`` and
    ``max_model_len`` default to the server's own choice (512 MiB of KV cache on
    CPU, the model's length). ``admin_key`` is generated unless given.
    """

    def __init__(self, model_dir: str | Path, *extra: str, log_path: str | Path,
                 served_name: str = "model", port: int | None = None,
                 env: dict[str, str] | None = None, dtype: str = "float32",
                 kv_cache_bytes: int | None = None, max_model_len: int | None = None,
                 admin_key: str | None = None, enforce_eager: bool = True,
                 start_timeout: float = 300.0) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.admin_key = admin_key
        if admin_key is None and "--admin-key" not in extra:
            self.admin_key = secrets.token_hex(8)
            extra = (*extra, "--admin-key", self.admin_key)
        self.cmd = [
            sys.executable, "-m", "server.app", str(model_dir), "--host", "127.0.0.1",
            "--port", str(self.port), "--served-model-name", served_name, "--dtype", dtype,
            *(["--enforce-eager"] if enforce_eager else []),
            *(["--kv-cache-memory-bytes", str(kv_cache_bytes)] if kv_cache_bytes else []),
            *(["--max-model-len", str(max_model_len)] if max_model_len else []),
            *(["--admin-key", admin_key] if admin_key is not None else []), *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self._log: Any = None
        self._previous_sigterm: Any = None

    # ------------------------------------------------------------- lifecycle
    def start(self, timeout: float | None = None) -> ServerProcess:
        timeout = self.start_timeout if timeout is None else timeout
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=self.env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"server exited with {code}; see {self.log_path}:\n" + self.log_tail())
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout}s; see {self.log_path}")

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    def stop(self) -> None:
        """Stop the server's whole process group (engine core and workers too)."""
        if self.proc is not None:
            stop_process_group(self.proc, grace_s=60)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        """Start (unless started) and stop on exit, SIGTERM of this process included."""
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.getsignal(signal.SIGTERM)
            exit_on_sigterm()
        try:
            if self.proc is None:
                self.start()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            if self._previous_sigterm is not None:
                signal.signal(signal.SIGTERM, self._previous_sigterm)
                self._previous_sigterm = None


@contextlib.contextmanager
def serve(model_dir: str | Path, *extra: str, log_path: str | Path,
          max_sets: int = defaults.MAX_RESIDENT_SETS,
          timeout: float = 900.0, bind_all_cores: bool = False, announce: Any = None,
          **kwargs: Any) -> Iterator[ServerProcess]:
    """A started :class:`ServerProcess` for the ``with`` block.

    ``max_sets`` sets stay resident on the workers (more wait for a slot); the
    workers' slot table gets :func:`worker_slots` slots unless the environment
    already asks for more. ``announce`` (e.g. ``console.print``) reports start-up.
    """
    if bind_all_cores:
        bind_worker_to_all_cores()
    env = dict(kwargs.pop("env", {}))
    merged = {**os.environ, **env}
    ensure_worker_slots(merged, max_sets)
    env[ENV_WORKER_SLOTS] = merged[ENV_WORKER_SLOTS]
    server = ServerProcess(model_dir, *extra, "--max-sets", str(max_sets), log_path=log_path,
                           env=env, start_timeout=timeout, **kwargs)
    say = announce or (lambda *_: None)
    say(f"starting the server for {model_dir} (log: {log_path}) ...")
    t0 = time.monotonic()
    with server:
        say(f"server up at {server.url} after {time.monotonic() - t0:.0f} s")
        yield server
