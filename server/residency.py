"""Resident slots for neuron sets: who holds one, who waits for one, in what order.

The workers keep at most ``capacity`` sets resident (``--max-sets``). This is
the server's scheduler for those slots, modelled on vLLM's multi-LoRA serving
(``--max-loras`` adapters per batch, the rest cached on the host, a request
whose adapter cannot be placed waits in the queue instead of failing):

* A request for a resident set starts at once, without any lock: slot changes
  never stall requests whose set is already resident.
* A request for a set that is not resident joins one FIFO queue. The head of
  the queue gets a free slot if there is one, else the least recently used
  *idle* resident set is unloaded for it. If every candidate is busy, the
  least recently used one is marked *draining*: new requests for it queue
  behind the head instead of joining it, so its running requests finish, it
  is evicted, and the head goes on. Requests end, so every waiter is served
  in arrival order: no starvation.
* A waiter gives up after ``timeout`` seconds with :class:`SlotWaitTimeout`
  (the HTTP layer answers 503 with ``Retry-After``); a waiter whose client
  went away leaves the queue.
* *Protected* sets (the default) are never evicted.

Loading and unloading are callbacks (worker RPCs in the server, plain
functions in tests). They run under one ``asyncio.Lock``, which control calls
share, so the workers see one slot change at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from vllm_negablate.neuron_set import NeuronSetError

Loader = Callable[[str], Awaitable[None]]


class SlotWaitTimeout(NeuronSetError):
    """No slot could be freed for a set within the wait limit."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SetGone(NeuronSetError):
    """The set a request waited for was deleted meanwhile."""


class NoEvictableSlot(NeuronSetError):
    """Every slot holds a protected set, so waiting cannot help."""


@dataclass(eq=False)
class _Waiter:
    name: str
    since: float = field(default_factory=time.monotonic)
    granted: bool = False
    error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.granted or self.error is not None


class SlotScheduler:
    """FIFO admission of neuron sets into ``capacity`` resident slots.

    ``known(name)`` says whether a set may still be loaded (it was not deleted),
    ``protected()`` which resident sets must stay (the default).
    """

    def __init__(
        self,
        capacity: int,
        load: Loader,
        unload: Loader,
        *,
        known: Callable[[str], bool] = lambda name: True,
        protected: Callable[[], set[str]] = set,
        lock: asyncio.Lock | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._load = load
        self._unload = unload
        self._known = known
        self._protected = protected
        self.lock = lock or asyncio.Lock()
        self.last_used: dict[str, float] = {}  # resident sets -> last grant
        self.in_flight: Counter[str] = Counter()
        self.draining: str | None = None
        self._queue: deque[_Waiter] = deque()
        self._changed = asyncio.Event()
        self.waits: deque[float] = deque(maxlen=4096)  # seconds queued, recent waiters

    # ------------------------------------------------------------------ views
    @property
    def resident(self) -> list[str]:
        return sorted(self.last_used)

    def waiting(self) -> Counter[str]:
        return Counter(w.name for w in self._queue if not w.done)

    def wait_stats(self) -> dict[str, float | int]:
        """Seconds that recent requests for non-resident sets spent queued."""
        waits = sorted(self.waits)
        if not waits:
            return {"count": 0, "p50_s": 0.0, "p99_s": 0.0, "max_s": 0.0}

        def q(p: float) -> float:
            return round(waits[min(len(waits) - 1, int(p * len(waits)))], 4)

        return {"count": len(waits), "p50_s": q(0.5), "p99_s": q(0.99), "max_s": round(waits[-1], 4)}

    def is_usable(self, name: str) -> bool:
        """Resident and not being drained: a request can start on it right away."""
        return name in self.last_used and name != self.draining

    # ------------------------------------------------------------- signalling
    def notify(self) -> None:
        """Wake every coroutine waiting for a change (a release, a new default, ...).

        A fresh event per generation: an ``asyncio.Event`` binds to the loop that
        first waits on it, and the unit tests drive the scheduler from several loops.
        """
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for_change(self, event: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event.wait(), max(timeout, 0.0))
        except asyncio.TimeoutError:
            pass

    @property
    def change_event(self) -> asyncio.Event:
        """Take this *before* checking a condition, then wait on it."""
        return self._changed

    # ------------------------------------------------------------ per request
    def _grant(self, name: str) -> None:
        self.in_flight[name] += 1
        self.last_used[name] = time.monotonic()

    async def acquire(self, name: str, timeout: float) -> float:
        """Hold one use of ``name``, waiting (FIFO, bounded) until it is resident.

        Returns the seconds spent waiting. Every successful call needs one
        :meth:`release`.
        """
        if self.is_usable(name):
            self._grant(name)
            return 0.0
        waiter = _Waiter(name)
        self._queue.append(waiter)
        deadline = waiter.since + timeout
        try:
            while True:
                event = self.change_event
                await self.advance()
                if waiter.done:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    ahead = sum(1 for w in self._queue if w is not waiter and w.since < waiter.since)
                    raise SlotWaitTimeout(
                        f"neuron set {name!r} waited {timeout:g} s for one of the "
                        f"{self.capacity} resident slots (held: {self.resident}; "
                        f"{ahead} request(s) ahead in the queue); retry later or raise "
                        "--max-sets",
                        retry_after=min(max(timeout / 4, 1.0), 30.0),
                    )
                await self.wait_for_change(event, remaining)
        except BaseException:
            if waiter.granted:  # granted, then cancelled before we could return
                self.release(name)
            else:
                waiter.error = waiter.error or RuntimeError("abandoned")
                self._drop(waiter)
            raise
        if waiter.error is not None:
            raise waiter.error
        waited = time.monotonic() - waiter.since
        self.waits.append(waited)
        return waited

    def release(self, name: str) -> None:
        self.in_flight[name] -= 1
        if self.in_flight[name] <= 0:
            del self.in_flight[name]
        self.notify()

    def _drop(self, waiter: _Waiter) -> None:
        try:
            self._queue.remove(waiter)
        except ValueError:
            pass
        self.notify()

    # -------------------------------------------------------------- the queue
    async def advance(self) -> None:
        """Serve the queue from its head as far as slots allow (under the lock)."""
        async with self.lock:
            progressed = await self._advance_locked()
        if progressed:
            self.notify()

    async def _advance_locked(self) -> bool:
        self.draining = None
        progressed = False
        while self._queue:
            waiter = self._queue[0]
            if waiter.done:
                self._queue.popleft()
                continue
            name = waiter.name
            if not self._known(name):
                waiter.error = SetGone(f"neuron set {name!r} was deleted while the request waited")
            elif name in self.last_used:
                self._grant(name)
                waiter.granted = True
            elif len(self.last_used) < self.capacity:
                try:
                    await self._load(name)
                except Exception as exc:  # e.g. the workers refused it: fail this waiter only
                    waiter.error = exc
                else:
                    self._grant(name)
                    waiter.granted = True
            else:
                candidates = [n for n in self.last_used if n not in self._protected()]
                if not candidates:
                    waiter.error = NoEvictableSlot(
                        f"neuron set {name!r} cannot be made resident: all {self.capacity} "
                        f"slots hold the default set ({self.resident}); raise --max-sets"
                    )
                else:
                    idle = [n for n in candidates if self.in_flight[n] == 0]
                    if not idle:
                        self.draining = min(candidates, key=self.last_used.__getitem__)
                        return progressed
                    victim = min(idle, key=self.last_used.__getitem__)
                    last = self.last_used.pop(victim)  # non-resident first: new requests queue
                    try:
                        await self._unload(victim)
                    except Exception as exc:
                        self.last_used[victim] = last
                        waiter.error = exc
                    else:
                        progressed = True
                        continue  # the head tries again with a free slot
            self._queue.popleft()
            progressed = True
        return progressed

    # ------------------------------------------------------------- control
    def forget(self, name: str) -> None:
        """The set left the workers by a control call (deleted or replaced out of band)."""
        self.last_used.pop(name, None)
        self.notify()

