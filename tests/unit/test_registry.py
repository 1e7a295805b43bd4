"""Server-side set registry against real worker logic (WorkerRuntime on a fake model).

The RPC function calls the worker-extension methods in-process, so the
registry's bookkeeping is checked against what a worker really accepts.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from server.registry import SetInUse, SetNotFound, SetRegistry, WorkerError
from vllm_negablate.context import set_runtime
from vllm_negablate.neuron_set import LayerAblation, NeuronSet
from vllm_negablate.runtime import WorkerRuntime
from vllm_negablate.testing.fake_model import FakeModel, fake_fingerprint, random_weights
from vllm_negablate.worker_extension import NegablateWorkerExtension

FP = fake_fingerprint(2, 8)


def make_set(name, neurons=(1, 2), layer=0):
    return NeuronSet(name=name, model=FP, entries=[LayerAblation(layer=layer, neurons=list(neurons))])


@pytest.fixture
def engine():
    rt = WorkerRuntime.for_model(FakeModel(random_weights(2, 8, 4)), FP, max_sets=8, max_num_tokens=16)
    set_runtime(rt)
    calls = []

    async def rpc(method, *args):
        calls.append(method)
        return [getattr(NegablateWorkerExtension, method)(None, *args)]

    yield rt, rpc, calls
    set_runtime(None)


def run(coro):
    return asyncio.run(coro)


def test_put_persists_and_restart_reloads_skipping_corrupt_files(engine, tmp_path):
    rt, rpc, _ = engine
    reg = SetRegistry(rpc, tmp_path, max_resident=4)
    run(reg.startup())
    run(reg.put(make_set("a")))
    run(reg.put(make_set("b", (3,))))
    run(reg.set_default("b"))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [".default.json", "a.json", "b.json"]
    (tmp_path / "a.json").write_text((tmp_path / "a.json").read_text()[:40])  # truncated
    (tmp_path / "c.json").write_text(make_set("other").model_dump_json())  # name != file
    rt2 = WorkerRuntime.for_model(FakeModel(random_weights(2, 8, 4)), FP, max_num_tokens=16)
    set_runtime(rt2)
    reg2 = SetRegistry(rpc, tmp_path, max_resident=4)
    run(reg2.startup())
    assert sorted(reg2.sets) == ["b"] and reg2.default == "b"
    assert "a.json" in reg2.load_errors and "c.json" in reg2.load_errors
    assert "file name and set name" in reg2.load_errors["c.json"]
    assert rt2.default_name == "b" and sorted(rt2.names) == ["b"]


def test_uploads_need_no_slot_and_sets_become_resident_on_first_use(engine, tmp_path):
    rt, rpc, calls = engine
    reg = SetRegistry(rpc, tmp_path, max_resident=1)
    run(reg.startup())
    run(reg.put(make_set("a")))
    assert reg.resident == [] and rt.names == {} and (tmp_path / "a.json").exists()
    run(reg.acquire("a"))  # a request is using a: the one slot is taken
    run(reg.put(make_set("b", (3,))))  # still accepted and saved
    assert sorted(reg.sets) == ["a", "b"] and reg.resident == ["a"] and (tmp_path / "b.json").exists()
    assert calls.count("negablate_load_set") == 1
    reg.release("a")
    run(reg.acquire("b"))  # b comes in, idle a goes
    assert reg.resident == ["b"] and sorted(rt.names) == ["b"]
    reg.release("b")


def test_lru_eviction_skips_in_use_and_default_and_reloads_on_demand(engine):
    rt, rpc, _ = engine
    reg = SetRegistry(rpc, None, max_resident=2)
    run(reg.startup())
    for name, neurons in (("a", (1, 2)), ("b", (3,)), ("c", (4,))):
        run(reg.put(make_set(name, neurons)))
    run(reg.acquire("b"))
    reg.release("b")
    run(reg.acquire("a"))  # a request is using a
    run(reg.acquire("c"))  # must evict b (a is in use)
    assert reg.resident == ["a", "c"] and sorted(rt.names) == ["a", "c"]
    reg.release("a")
    reg.release("c")
    run(reg.set_default("c"))
    run(reg.acquire("b"))  # evicted b comes back; a (LRU, unused) goes, c is the default
    assert reg.resident == ["b", "c"] and sorted(rt.names) == ["b", "c"]
    reg.release("b")
    assert dict(reg.in_flight) == {}


def test_replacing_a_set_in_use_waits_for_its_requests_and_later_ones_get_the_new_content(engine, tmp_path):
    """A set's content never changes under a running request (vLLM admits a request's
    prompts one by one: a re-point in between would mix two contents in one answer)."""
    rt, rpc, _ = engine

    async def main():
        reg = SetRegistry(rpc, tmp_path, max_resident=2, wait_timeout=0.3)
        await reg.startup()
        old, new = make_set("a", (1,)), make_set("a", (5, 6))
        await reg.put(old)
        await reg.acquire("a")
        # still in use after the wait limit: SetInUse, nothing replaced anywhere
        with pytest.raises(SetInUse, match="still used by 1 running request.*it was not replaced"):
            await reg.put(new)
        assert rt.names["a"] == old.content_hash() and reg.sets["a"] == old
        assert NeuronSet.load(tmp_path / "a.json") == old and not reg.replacing
        # released during the wait: replaced then; a request arriving meanwhile waits for it
        uploading = asyncio.create_task(reg.put(new))
        await asyncio.sleep(0.02)
        assert rt.names["a"] == old.content_hash() and reg.content_hash("a") == old.content_hash()
        late = asyncio.create_task(reg.acquire("a"))
        await asyncio.sleep(0.02)
        assert not late.done() and not uploading.done() and reg.in_flight["a"] == 1
        reg.release("a")
        await uploading
        await late
        assert rt.names["a"] == new.content_hash() and reg.content_hash("a") == new.content_hash()
        assert NeuronSet.load(tmp_path / "a.json") == new and reg.in_flight["a"] == 1
        reg.release("a")
        # idle and resident: the workers are re-pointed at once
        await reg.put(old)
        assert rt.names["a"] == old.content_hash() and dict(reg.in_flight) == {}

    run(main())


def test_delete_waits_for_running_requests_and_refuses_new_ones(engine, tmp_path):
    rt, rpc, _ = engine

    async def main():
        reg = SetRegistry(rpc, tmp_path, max_resident=2, wait_timeout=0.2)
        await reg.startup()
        await reg.put(make_set("a"))
        await reg.acquire("a")
        # still in use after the wait limit: 409-style SetInUse, nothing deleted
        with pytest.raises(SetInUse, match="still used by 1 running request"):
            await reg.delete("a")
        assert "a" in reg.sets and (tmp_path / "a.json").exists() and "a" in rt.names
        # released during the wait: deleted; new requests are refused meanwhile
        deleting = asyncio.create_task(reg.delete("a"))
        await asyncio.sleep(0.02)
        with pytest.raises(SetNotFound, match="being deleted"):
            await reg.acquire("a")
        reg.release("a")
        await deleting
        assert "a" not in reg.sets and not (tmp_path / "a.json").exists() and "a" not in rt.names
        assert dict(reg.in_flight) == {}

    run(main())


def test_reserved_name_and_none_default(engine):
    rt, rpc, _ = engine
    reg = SetRegistry(rpc, None, max_resident=2)
    run(reg.startup())
    with pytest.raises(ValueError, match="reserved"):
        make_set("none")
    with pytest.raises(ValueError, match="reserved"):
        make_set("None")
    run(reg.put(make_set("a")))
    run(reg.set_default("a"))
    run(reg.set_default("none"))  # the selector means "no default"
    assert reg.default is None and rt.default_name is None


def test_rejected_calls_change_nothing(engine, tmp_path):
    rt, rpc, _ = engine
    reg = SetRegistry(rpc, tmp_path, max_resident=4)
    run(reg.startup())
    run(reg.put(make_set("a")))
    before = (dict(reg.sets), reg.resident, reg.default, sorted(p.name for p in tmp_path.iterdir()))
    wrong = NeuronSet(name="w", model=fake_fingerprint(3, 8))
    with pytest.raises(Exception, match="num_layers: set has 3, model has 2"):
        run(reg.put(wrong))
    with pytest.raises(SetNotFound, match="unknown neuron set 'zz'"):
        run(reg.set_default("zz"))
    with pytest.raises(SetNotFound):
        run(reg.delete("zz"))
    # a worker-side failure: the fingerprint check is bypassed to reach the worker,
    # replacing the resident set "a"
    run(reg.acquire("a"))
    reg.release("a")
    before = (dict(reg.sets), reg.resident, reg.default, sorted(p.name for p in tmp_path.iterdir()))
    reg.fingerprint = None
    with pytest.raises(WorkerError, match="num_layers"):
        run(reg.put(wrong.model_copy(update={"name": "a"})))
    assert (dict(reg.sets), reg.resident, reg.default, sorted(p.name for p in tmp_path.iterdir())) == before
    assert json.loads((tmp_path / "a.json").read_text())["name"] == "a"


def test_delete_clears_default_and_file(engine, tmp_path):
    rt, rpc, _ = engine
    reg = SetRegistry(rpc, tmp_path, max_resident=4)
    run(reg.startup())
    run(reg.put(make_set("a")))
    run(reg.set_default("a"))
    run(reg.delete("a"))
    assert reg.default is None and rt.default_name is None and not (tmp_path / "a.json").exists()
    assert json.loads((tmp_path / ".default.json").read_text()) == {"name": None}


def test_the_content_hash_is_computed_once_per_held_object(engine, tmp_path, monkeypatch):
    """The registry hashes the set it holds once (listings, the middleware's check); a
    replaced name is hashed afresh; an object it no longer holds (a PUT's reply after another
    upload won the race) gets its own hash, and the name keeps the held object's."""
    _, rpc, _ = engine
    reg = SetRegistry(rpc, tmp_path, max_resident=4)
    run(reg.startup())
    calls = []
    real = NeuronSet.content_hash
    monkeypatch.setattr(NeuronSet, "content_hash", lambda self: calls.append(self.name) or real(self))
    first, second = make_set("a", (1, 2)), make_set("a", (3,))
    run(reg.put(first))
    calls.clear()  # what put itself hashes is the workers' business
    held = reg.content_hash("a")
    assert reg.content_hash("a") == reg.hash_of(first) == held == real(first) and calls == ["a"]
    run(reg.put(second))
    calls.clear()
    assert reg.content_hash("a") == reg.content_hash("a") == real(second) != held and len(calls) == 1
    assert reg.hash_of(first) == reg.hash_of(first) == held and len(calls) == 3  # not held: never remembered
    assert reg.content_hash("a") == real(second) and len(calls) == 3
