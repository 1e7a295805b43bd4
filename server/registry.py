"""Which neuron sets the server knows, which are resident, and who is using them.

The registry is the server's source of truth for *known* sets (uploaded or
found on disk) and the default; :class:`server.residency.SlotScheduler`
decides which of them are resident on the workers (at most ``max_resident``)
and makes requests for the others wait their turn.

* Uploads never depend on load: a set is validated against the model's shape
  here (no worker slot needed), saved, and becomes resident on first use.
  Replacing a set that running requests use *waits* for them, as a delete does
  (new requests for the name wait behind the upload and get the new content):
  a set's content never changes under a request, whose several prompts vLLM
  admits one at a time. If the name is resident, the workers are then
  re-pointed to the new content at once.
* ``DELETE`` of a set that running requests use *waits* for them (bounded by
  the same wait limit as requests); new requests for it are refused (404)
  from the moment the delete is asked for. If they do not finish in time,
  the delete is abandoned with :class:`SetInUse` (HTTP 409, with the count)
  and the set stays.
* Control calls and slot changes go through one ``asyncio.Lock`` so the
  workers see them one at a time; a call that fails on the workers leaves the
  registry and the files as they were.
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

from server.residency import SlotScheduler, SlotWaitTimeout
from vllm_negablate.runtime import SlotsExhausted
from vllm_negablate.neuron_set import (
    NO_ABLATION,
    ModelFingerprint,
    NeuronSet,
    NeuronSetError,
)

logger = logging.getLogger("negablate.server")

RPC = Callable[..., Awaitable[list[dict[str, Any]]]]  # (method, *args) -> one reply per worker
DEFAULT_FILE = ".default.json"
DEFAULT_WAIT_TIMEOUT = 240.0  # seconds; under the clients' request timeouts (300-600 s)


class SetNotFound(NeuronSetError):
    pass


class SetInUse(NeuronSetError):
    """A delete (or an upload during a delete) that conflicts with running requests."""


class WorkerError(NeuronSetError):
    @property
    def slots_exhausted(self) -> bool:
        """The workers had no free slot (not: the set is invalid)."""
        return f"{SlotsExhausted.__name__}:" in str(self)


class SetRegistry:
    def __init__(
        self, rpc: RPC, sets_dir: Path | None, max_resident: int,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        self._rpc = rpc
        self.sets_dir = sets_dir
        self.max_resident = max_resident
        self.wait_timeout = wait_timeout
        self.sets: dict[str, NeuronSet] = {}
        self._hashes: dict[str, tuple[NeuronSet, str]] = {}  # name -> (content, its hash)
        self.default: str | None = None
        self.fingerprint: ModelFingerprint | None = None
        self.load_errors: dict[str, str] = {}
        self.deleting: set[str] = set()
        self.replacing: set[str] = set()  # uploads waiting for a set's running requests
        self._upload_locks: dict[str, asyncio.Lock] = {}
        self.slots = SlotScheduler(
            max_resident, self._load_on_workers, self._unload_from_workers,
            known=lambda name: name in self.sets and name not in self.deleting,
            protected=lambda: {self.default} if self.default else set(),
        )

    # ---------------------------------------------------------------- helpers
    async def _call(self, method: str, *args: Any) -> dict[str, Any]:
        replies = await self._rpc(method, *args)
        errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
        if errors:
            raise WorkerError("; ".join(errors))
        return replies[0]["state"]

    async def _load_on_workers(self, name: str) -> None:
        await self._call("negablate_load_set", self.sets[name].model_dump_json())

    async def _unload_from_workers(self, name: str) -> None:
        await self._call("negablate_unload_set", name)
        logger.info("neuron set %r unloaded from the workers (least recently used)", name)

    @property
    def resident(self) -> list[str]:
        return self.slots.resident

    @property
    def in_flight(self) -> Counter[str]:
        return self.slots.in_flight

    def _path(self, name: str) -> Path | None:
        return None if self.sets_dir is None else self.sets_dir / f"{name}.json"

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
            if len(self.slots.last_used) < self.max_resident:  # warm start; the rest on demand
                await self._load_on_workers(ns.name)
                self.slots.last_used[ns.name] = time.monotonic()
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
        """Validate against the model and save; never needs a free slot.

        Replacing a set that requests are using waits until they finish (bounded, like
        :meth:`delete`; new requests for it wait behind the upload): a set's content never
        changes under a running request, so every prompt of a request with several is
        scored with one content (vLLM admits them one by one), and no request the engine
        admitted under the old content finds it unloaded (NaN). Past the wait limit:
        :class:`SetInUse`, nothing replaced.
        """
        if self.fingerprint is not None:
            ns.check_compatible(self.fingerprint)
        if ns.name in self.deleting:
            raise SetInUse(f"neuron set {ns.name!r} is being deleted; upload it again once "
                           "the delete has finished")
        lock = self._upload_locks.setdefault(ns.name, asyncio.Lock())
        async with lock:  # one upload of a name at a time, in arrival order
            self.replacing.add(ns.name)
            try:
                await self._drain(ns.name, "replaced")
                await self._store(ns)
            finally:
                self.replacing.discard(ns.name)
                self.slots.notify()
        return ns

    async def _store(self, ns: NeuronSet) -> None:
        async with self.slots.lock:
            if ns.name in self.deleting:
                raise SetInUse(f"neuron set {ns.name!r} is being deleted; upload it again once "
                               "the delete has finished")
            if ns.name in self.slots.last_used:
                # resident and idle (drained): re-point the name to the new content; if the
                # workers cannot take it, unload the name instead and let the next request
                # load the new content
                try:
                    await self._call("negablate_load_set", ns.model_dump_json())
                except WorkerError as exc:
                    if ns.name == self.default or not exc.slots_exhausted:
                        raise
                    logger.warning("neuron set %r: reload refused (%s); unloading it, the next "
                                   "request loads the new content", ns.name, exc)
                    await self._call("negablate_unload_set", ns.name)
                    self.slots.forget(ns.name)
            path = self._path(ns.name)
            if path is not None:
                ns.save(path)
            self.sets[ns.name] = ns

    async def _drain(self, name: str, verb: str) -> None:
        """Wait until no request holds ``name`` (:attr:`wait_timeout` at most, else
        :class:`SetInUse`); the caller keeps new requests from taking it meanwhile."""
        deadline = time.monotonic() + self.wait_timeout
        while self.in_flight[name]:
            event = self.slots.change_event  # taken before waiting: no release is missed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SetInUse(
                    f"neuron set {name!r} is still used by {self.in_flight[name]} running "
                    f"request(s) after {self.wait_timeout:g} s; it was not {verb}"
                )
            await self.slots.wait_for_change(event, remaining)

    def get(self, name: str) -> NeuronSet:
        try:
            return self.sets[name]
        except KeyError:
            raise SetNotFound(
                f"unknown neuron set {name!r}; known: {sorted(self.sets)}"
            ) from None

    def content_hash(self, name: str) -> str:
        """``get(name).content_hash()``, computed once per uploaded content: the
        completions middleware checks it on every request that names a hash, and
        /v1/models lists it on every ``BASE@SET`` card."""
        return self.hash_of(self.get(name))

    def hash_of(self, ns: NeuronSet) -> str:
        """``ns.content_hash()``, reused while ``ns`` is the object the registry holds under
        its name (a listing describes each set; a PUT's reply describes the object it
        uploaded, which another upload may already have replaced: then it is hashed
        afresh and not remembered)."""
        known = self._hashes.get(ns.name)
        if known is not None and known[0] is ns:
            return known[1]
        digest = ns.content_hash()
        if self.sets.get(ns.name) is ns:
            self._hashes[ns.name] = (ns, digest)
        return digest

    async def delete(self, name: str) -> None:
        """Remove a set once the requests using it have finished (bounded wait)."""
        self.get(name)
        if name in self.deleting:
            raise SetInUse(f"neuron set {name!r} is already being deleted")
        self.deleting.add(name)
        self.slots.notify()  # queued requests for it fail now
        try:
            await self._drain(name, "deleted")
            async with self.slots.lock:
                if name in self.slots.last_used:
                    await self._call("negablate_unload_set", name)
                    self.slots.forget(name)
                del self.sets[name]
                self._hashes.pop(name, None)
                if self.default == name:
                    self.default = None
                    self._save_default()
                path = self._path(name)
                if path is not None and path.exists():
                    path.unlink()
        finally:
            self.deleting.discard(name)
            self.slots.notify()

    async def set_default(self, name: str | None) -> None:
        """Make ``name`` (None or ``"none"``: no ablation) what requests naming no set get."""
        if name == NO_ABLATION:
            name = None
        if name is None:
            async with self.slots.lock:
                await self._call("negablate_set_default", None)
                self.default = None
                self._save_default()
            self.slots.notify()
            return
        self.get(name)
        if name in self.deleting:
            raise SetNotFound(f"neuron set {name!r} is being deleted")
        await self.slots.acquire(name, self.wait_timeout)  # resident, and held while we switch
        try:
            async with self.slots.lock:
                await self._call("negablate_set_default", name)
                self.default = name
                self._save_default()
        finally:
            self.slots.release(name)

    def _save_default(self) -> None:
        if self.sets_dir is None:
            return
        path = self.sets_dir / DEFAULT_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"name": self.default}))
        tmp.replace(path)

    # ------------------------------------------------------------ per request
    async def acquire(self, name: str) -> float:
        """Hold ``name`` for one request: at once if resident, else wait for a slot; a set
        being replaced is waited for first (the request gets the new content).

        Returns the seconds waited; raises :class:`SetNotFound` for an unknown set
        (or one being deleted) and ``SlotWaitTimeout`` after the wait limit.
        """
        started, waited = time.monotonic(), 0.0
        while True:
            self.get(name)
            if name in self.deleting:
                raise SetNotFound(f"neuron set {name!r} is being deleted")
            if name not in self.replacing:
                break
            event = self.slots.change_event
            remaining = started + self.wait_timeout - time.monotonic()
            if remaining <= 0:
                raise SlotWaitTimeout(
                    f"neuron set {name!r} is being replaced and its running requests did not "
                    f"finish within {self.wait_timeout:g} s; retry later",
                    retry_after=min(max(self.wait_timeout / 4, 1.0), 30.0))
            await self.slots.wait_for_change(event, remaining)
            waited = time.monotonic() - started
        return waited + await self.slots.acquire(name, max(self.wait_timeout - waited, 0.0))

    def release(self, name: str) -> None:
        self.slots.release(name)

    async def worker_states(self) -> list[dict[str, Any]]:
        replies = await self._rpc("negablate_state")
        errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
        if errors:
            raise WorkerError("; ".join(errors))
        return [r["state"] for r in replies]
