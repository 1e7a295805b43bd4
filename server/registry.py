"""Which neuron sets the server knows, which are resident, and who is using them.

The registry is the server's source of truth; the workers hold at most
``max_resident`` sets. A set uploaded or found on disk stays *known*; when
room is needed the least recently used resident set that no running request
uses (and that is not the default) is unloaded from the workers and reloaded
on its next use. Every change goes through one ``asyncio.Lock`` so control
calls are applied one at a time and never half-way: a call that fails on the
workers leaves the registry and the files as they were.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vllm_negablate.neuron_set import (
    ModelFingerprint,
    NeuronSet,
    NeuronSetError,
)

logger = logging.getLogger("negablate.server")

RPC = Callable[..., Awaitable[list[dict[str, Any]]]]  # (method, *args) -> one reply per worker
DEFAULT_FILE = ".default.json"


class SetNotFound(NeuronSetError):
    pass


class CapacityError(NeuronSetError):
    pass


class WorkerError(NeuronSetError):
    pass


class SetRegistry:
    def __init__(self, rpc: RPC, sets_dir: Path | None, max_resident: int) -> None:
        self._rpc = rpc
        self.sets_dir = sets_dir
        self.max_resident = max_resident
        self.sets: dict[str, NeuronSet] = {}
        self.last_used: dict[str, float] = {}  # resident sets only
        self.in_flight: Counter[str] = Counter()
        self.default: str | None = None
        self.fingerprint: ModelFingerprint | None = None
        self.load_errors: dict[str, str] = {}
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- helpers
    async def _call(self, method: str, *args: Any) -> dict[str, Any]:
        replies = await self._rpc(method, *args)
        errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
        if errors:
            raise WorkerError("; ".join(errors))
        return replies[0]["state"]

    @property
    def resident(self) -> list[str]:
        return sorted(self.last_used)

    def _path(self, name: str) -> Path | None:
        return None if self.sets_dir is None else self.sets_dir / f"{name}.json"

    async def _make_room(self, keep: str) -> None:
        while len(self.last_used) >= self.max_resident:
            candidates = [
                n for n in self.last_used
                if n != keep and n != self.default and self.in_flight[n] == 0
            ]
            if not candidates:
                raise CapacityError(
                    f"all {self.max_resident} resident slots hold sets that are in use or the "
                    f"default ({self.resident}); retry later or raise --max-sets"
                )
            victim = min(candidates, key=self.last_used.__getitem__)
            # mark it non-resident first: a request arriving during the RPC reloads it
            last = self.last_used.pop(victim)
            try:
                await self._call("negablate_unload_set", victim)
            except Exception:
                self.last_used[victim] = last
                raise
            logger.info("evicted neuron set %r from the workers (least recently used)", victim)

    async def _make_resident(self, ns: NeuronSet) -> None:
        if ns.name not in self.last_used:
            await self._make_room(keep=ns.name)
        await self._call("negablate_load_set", ns.model_dump_json())
        self.last_used[ns.name] = time.monotonic()

    # -------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        """Read the model fingerprint from the workers, then load sets from disk."""
        state = await self._call("negablate_state")
        self.fingerprint = ModelFingerprint(**state["fingerprint"])
        if self.sets_dir is None:
            return
        self.sets_dir.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.sets_dir.glob("*.json")):
            if path.name == DEFAULT_FILE:
                continue
            try:
                ns = NeuronSet.load(path)
                ns.check_compatible(self.fingerprint)
                if ns.name != path.stem:
                    raise NeuronSetError(f"{path}: file name and set name {ns.name!r} differ")
            except NeuronSetError as exc:
                self.load_errors[path.name] = str(exc)
                logger.error("neuron set file %s not loaded: %s", path, exc)
                continue
            self.sets[ns.name] = ns
            if len(self.last_used) < self.max_resident:
                await self._make_resident(ns)
        default_path = self.sets_dir / DEFAULT_FILE
        if default_path.exists():
            try:
                name = json.loads(default_path.read_text())["name"]
                if name is not None:
                    await self.set_default(name)
            except Exception as exc:  # a bad default file must not stop the server
                logger.error("default-set file %s ignored: %s", default_path, exc)
        logger.info("neuron sets loaded: %s (default %s)", sorted(self.sets), self.default)

    # ---------------------------------------------------------------- control
    async def put(self, ns: NeuronSet) -> NeuronSet:
        if self.fingerprint is not None:
            ns.check_compatible(self.fingerprint)
        async with self._lock:
            await self._make_resident(ns)  # validated by the workers before anything is saved
            self.sets[ns.name] = ns
            path = self._path(ns.name)
            if path is not None:
                ns.save(path)
        return ns

    def get(self, name: str) -> NeuronSet:
        try:
            return self.sets[name]
        except KeyError:
            raise SetNotFound(
                f"unknown neuron set {name!r}; known: {sorted(self.sets)}"
            ) from None

    async def delete(self, name: str) -> None:
        self.get(name)
        async with self._lock:
            if self.in_flight[name]:
                raise CapacityError(f"neuron set {name!r} is used by {self.in_flight[name]} running requests")
            if name in self.last_used:
                await self._call("negablate_unload_set", name)
                del self.last_used[name]
            del self.sets[name]
            if self.default == name:
                self.default = None
                self._save_default()
            path = self._path(name)
            if path is not None and path.exists():
                path.unlink()

    async def set_default(self, name: str | None) -> None:
        if name is not None:
            ns = self.get(name)
        async with self._lock:
            if name is not None and name not in self.last_used:
                await self._make_resident(ns)
            await self._call("negablate_set_default", name)
            self.default = name
            self._save_default()

    def _save_default(self) -> None:
        if self.sets_dir is None:
            return
        path = self.sets_dir / DEFAULT_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"name": self.default}))
        tmp.replace(path)

    # ------------------------------------------------------------ per request
    async def acquire(self, name: str) -> None:
        """Mark ``name`` in use by one request, making it resident if it was evicted."""
        ns = self.get(name)
        self.in_flight[name] += 1
        try:
            if name not in self.last_used:
                async with self._lock:
                    if name not in self.last_used:
                        await self._make_resident(ns)
            self.last_used[name] = time.monotonic()
        except Exception:
            self.release(name)
            raise

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]

    async def worker_states(self) -> list[dict[str, Any]]:
        replies = await self._rpc("negablate_state")
        errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
        if errors:
            raise WorkerError("; ".join(errors))
        return [r["state"] for r in replies]
