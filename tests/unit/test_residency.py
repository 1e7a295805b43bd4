"""The slot scheduler alone: FIFO waiting, draining, bounded waits, no starvation.

Loads and unloads are recorded by fake callbacks that also check the one rule
the workers rely on: never more than ``capacity`` sets resident, and never a
set unloaded while a request holds it.
"""

from __future__ import annotations

import asyncio

import pytest

from server.residency import NoEvictableSlot, SetGone, SlotScheduler, SlotWaitTimeout


class FakeWorkers:
    def __init__(self, capacity: int, delay: float = 0.0) -> None:
        self.capacity = capacity
        self.delay = delay
        self.loaded: set[str] = set()
        self.log: list[str] = []
        self.sched: SlotScheduler | None = None

    async def load(self, name: str) -> None:
        await asyncio.sleep(self.delay)
        assert len(self.loaded) < self.capacity, (name, self.loaded)
        self.loaded.add(name)
        self.log.append(f"+{name}")

    async def unload(self, name: str) -> None:
        await asyncio.sleep(self.delay)
        assert self.sched is not None and self.sched.in_flight[name] == 0, f"{name} unloaded while in use"
        self.loaded.discard(name)
        self.log.append(f"-{name}")


def make(capacity: int, **kw) -> tuple[SlotScheduler, FakeWorkers]:
    workers = FakeWorkers(capacity, kw.pop("delay", 0.0))
    sched = SlotScheduler(capacity, workers.load, workers.unload, **kw)
    workers.sched = sched
    return sched, workers


def test_free_slots_then_lru_of_idle_sets():
    async def main():
        sched, w = make(2)
        assert await sched.acquire("a", 1) == pytest.approx(0, abs=0.05)
        await sched.acquire("b", 1)
        sched.release("a")
        sched.release("b")
        await sched.acquire("a", 1)  # touch a: b is now least recently used
        sched.release("a")
        await sched.acquire("c", 1)
        sched.release("c")
        assert w.log == ["+a", "+b", "-b", "+c"] and sched.resident == ["a", "c"]
        assert dict(sched.in_flight) == {}

    asyncio.run(main())


def test_busy_sets_are_drained_and_waiters_served_in_arrival_order():
    """Slots full of busy sets: the request waits, new requests for the drained set
    queue behind it, and it gets the slot as soon as the drained set's requests end."""

    async def main():
        sched, w = make(2)
        await sched.acquire("a", 1)
        await sched.acquire("b", 1)
        order: list[str] = []

        async def request(name: str, hold: float = 0.0) -> None:
            await sched.acquire(name, 5)
            order.append(name)
            await asyncio.sleep(hold)
            sched.release(name)

        c = asyncio.create_task(request("c"))
        await asyncio.sleep(0.01)
        assert sched.draining == "a" and sched.waiting() == {"c": 1}
        a2 = asyncio.create_task(request("a"))  # must not jump the queue: a is draining
        await asyncio.sleep(0.01)
        assert order == [] and sched.waiting() == {"c": 1, "a": 1}
        b2 = asyncio.create_task(request("b"))  # b is resident and not draining: starts now
        await asyncio.sleep(0.01)
        assert order == ["b"]
        sched.release("a")  # the drained set's last request ends
        await asyncio.gather(c, a2, b2)
        sched.release("b")
        assert order == ["b", "c", "a"]
        # b is held throughout, so a (drained) gives way to c, and idle c to a
        assert w.log == ["+a", "+b", "-a", "+c", "-c", "+a"]
        assert dict(sched.in_flight) == {}
        assert max(sched.waits) > 0

    asyncio.run(main())


def test_no_starvation_under_a_stream_of_requests_for_resident_sets():
    """A continuous stream on the resident sets cannot keep a waiter out forever."""

    async def main():
        sched, _ = make(2)
        stop = False

        async def hammer(name: str) -> None:
            while not stop:
                try:
                    await sched.acquire(name, 5)
                except SlotWaitTimeout:
                    raise
                await asyncio.sleep(0.002)
                sched.release(name)
                await asyncio.sleep(0)

        hammers = [asyncio.create_task(hammer(n)) for n in ("a", "b", "a", "b")]
        await asyncio.sleep(0.02)
        waited = await sched.acquire("c", 2)  # gets in although a and b never go idle by themselves
        sched.release("c")
        stop = True
        await asyncio.gather(*hammers)
        assert waited < 1.0
        assert dict(sched.in_flight) == {}

    asyncio.run(main())


def test_bounded_wait_then_timeout_and_the_queue_moves_on():
    async def main():
        sched, w = make(1)
        await sched.acquire("a", 1)
        with pytest.raises(SlotWaitTimeout, match="waited 0.1 s") as info:
            await sched.acquire("b", 0.1)
        assert info.value.retry_after >= 1
        assert sched.waiting() == {}
        sched.release("a")
        await sched.acquire("b", 1)  # the timed-out waiter left nothing behind
        sched.release("b")
        assert w.log == ["+a", "-a", "+b"]

    asyncio.run(main())


def test_cancelled_waiter_leaves_the_queue():
    async def main():
        sched, _ = make(1)
        await sched.acquire("a", 1)
        task = asyncio.create_task(sched.acquire("b", 5))
        await asyncio.sleep(0.01)
        assert sched.waiting() == {"b": 1}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sched.waiting() == {}
        sched.release("a")
        assert dict(sched.in_flight) == {}

    asyncio.run(main())


def test_protected_default_is_never_evicted_and_a_full_house_fails_fast():
    async def main():
        sched, w = make(1, protected=lambda: {"a"})
        await sched.acquire("a", 1)
        sched.release("a")
        with pytest.raises(NoEvictableSlot, match="hold the default"):
            await sched.acquire("b", 5)
        assert w.log == ["+a"]

    asyncio.run(main())


def test_a_set_deleted_while_waiting_fails_its_waiters():
    async def main():
        known = {"a", "b"}
        sched, _ = make(1, known=lambda n: n in known)
        await sched.acquire("a", 1)
        task = asyncio.create_task(sched.acquire("b", 5))
        await asyncio.sleep(0.01)
        known.discard("b")
        sched.notify()
        with pytest.raises(SetGone, match="deleted while the request waited"):
            await task
        sched.release("a")

    asyncio.run(main())


def test_concurrent_churn_keeps_capacity_and_serves_everyone():
    """Many clients, more sets than slots, slow loads: every request is served,
    the fake workers' assertions (capacity, nothing unloaded in use) hold."""

    async def main():
        sched, w = make(2, delay=0.001)
        names = ["a", "b", "c", "d"]
        served = 0

        async def client(k: int) -> None:
            nonlocal served
            for i in range(15):
                name = names[(k * 7 + i * 3) % 4]
                await sched.acquire(name, 10)
                await asyncio.sleep(0.001 * ((k + i) % 3))
                sched.release(name)
                served += 1

        await asyncio.gather(*(client(k) for k in range(8)))
        assert served == 120 and dict(sched.in_flight) == {}
        assert len(sched.resident) <= 2 and sum(1 for x in w.log if x.startswith("+")) > 4

    asyncio.run(main())
