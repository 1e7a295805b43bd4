"""The completions middleware in process: the ``none`` selector, waiting, 503 + Retry-After.

The downstream app stands in for vLLM and echoes the body it received, so the
test sees exactly what the engine would get. The registry runs over a real
WorkerRuntime on a fake model (as in the fuzz test).
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from server.middleware import NegablateMiddleware
from server.registry import SetRegistry
from vllm_negablate.context import set_runtime
from vllm_negablate.neuron_set import LayerAblation, NeuronSet
from vllm_negablate.runtime import WorkerRuntime
from vllm_negablate.testing.fake_model import FakeModel, fake_fingerprint, random_weights
from vllm_negablate.worker_extension import NegablateWorkerExtension

FP = fake_fingerprint(2, 8)


class EchoEngine:
    """Answers every request with the JSON body it got (what vLLM would see)."""

    def __init__(self) -> None:
        self.state = SimpleNamespace()
        self.release = asyncio.Event()
        self.hold = False

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        if self.hold:
            await self.release.wait()
        body = message.get("body", b"") or b"{}"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def make_app(max_resident: int = 1, wait_timeout: float = 0.3):
    runtime = WorkerRuntime.for_model(FakeModel(random_weights(2, 8, 4)), FP, max_sets=6, max_num_tokens=16)

    async def rpc(method, *args):
        set_runtime(runtime)
        return [getattr(NegablateWorkerExtension, method)(None, *args)]

    engine = EchoEngine()
    registry = SetRegistry(rpc, None, max_resident=max_resident, wait_timeout=wait_timeout)
    engine.state.negablate = registry
    engine.state.negablate_api_keys = []
    engine.state.openai_serving_models = SimpleNamespace(is_base_model=lambda name: name == "tiny")
    app = NegablateMiddleware(engine)

    async def asgi(scope, receive, send):  # the middleware reads the app's state from scope
        return await app({**scope, "app": engine}, receive, send)

    return asgi, engine, registry


def ns(name: str, neurons=(1,)) -> NeuronSet:
    return NeuronSet(name=name, model=FP, entries=[LayerAblation(layer=0, neurons=list(neurons))])


def test_none_selector_reaches_the_engine_as_none_and_holds_no_slot():
    async def main():
        asgi, engine, reg = make_app()
        await reg.startup()
        await reg.put(ns("a"))
        await reg.set_default("a")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            for body in ({"model": "tiny@none"}, {"model": "tiny", "vllm_xargs": {"neuron_set": "none"}}):
                r = await c.post("/v1/completions", json={**body, "prompt": "x"})
                assert r.status_code == 200
                assert r.json()["model"] == "tiny" and r.json()["vllm_xargs"] == {"neuron_set": "none"}
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            # naming no set: the default, resolved (and held) once for all the request's prompts
            assert r.json()["vllm_xargs"] == {"neuron_set": "a", "neuron_set_hash": reg.content_hash("a")}
            r = await c.post("/v1/completions", json={"model": "tiny@nope", "prompt": "x"})
            assert r.status_code == 404 and "`none`: no ablation" in r.json()["error"]["message"]
        assert dict(reg.in_flight) == {} and reg.slots.wait_stats()["count"] == 1  # set_default("a") only

    asyncio.run(main())


def test_a_request_waits_for_a_slot_then_gets_503_with_retry_after():
    async def main():
        asgi, engine, reg = make_app(max_resident=1, wait_timeout=0.3)
        await reg.startup()
        await reg.put(ns("a"))
        await reg.put(ns("b", (2,)))
        engine.hold = True
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            first = asyncio.create_task(c.post("/v1/completions", json={"model": "tiny@a", "prompt": "x"}))
            await asyncio.sleep(0.05)
            assert reg.in_flight["a"] == 1
            r = await c.post("/v1/completions", json={"model": "tiny@b", "prompt": "x"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "ServiceUnavailableError"
            assert "waited 0.3 s" in r.json()["error"]["message"]
            # the same request, sent while a's request finishes, waits and then runs
            late = asyncio.create_task(c.post("/v1/completions", json={"model": "tiny@b", "prompt": "y"}))
            await asyncio.sleep(0.05)
            assert reg.slots.waiting() == {"b": 1}
            engine.release.set()
            assert (await first).status_code == 200
            r = await late
            assert r.status_code == 200
            assert r.json()["vllm_xargs"] == {"neuron_set": "b", "neuron_set_hash": reg.content_hash("b")}
        assert reg.resident == ["b"] and dict(reg.in_flight) == {}

    asyncio.run(main())


def test_the_set_is_released_before_the_last_byte_so_a_following_delete_never_conflicts():
    async def main():
        asgi, engine, reg = make_app(max_resident=2)
        await reg.startup()
        await reg.put(ns("a"))
        seen: list[int] = []
        original = reg.release

        def spy(name):
            original(name)
            seen.append(reg.in_flight[name])

        reg.release = spy
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            for _ in range(5):
                r = await c.post("/v1/completions", json={"model": "tiny@a", "prompt": "x"})
                assert r.status_code == 200 and reg.in_flight["a"] == 0
        assert seen == [0] * 5  # released once per request
        await reg.delete("a")

    asyncio.run(main())


@pytest.mark.parametrize("name", ["none", "NONE", "None"])
def test_the_selector_name_is_reserved(name):
    with pytest.raises(ValueError, match="is reserved"):
        json.loads(ns(name).model_dump_json())


def test_a_request_naming_other_content_than_the_sets_gets_409_and_holds_nothing():
    """``vllm_xargs.neuron_set_hash``: the content the client began with. A set replaced
    under the same name since then answers 409 (the harness stops; its cache rows stay
    those of the old content); the hash the set has now goes through."""
    async def main():
        asgi, engine, reg = make_app(max_resident=2)
        await reg.startup()
        await reg.put(ns("a"))
        old = ns("a").content_hash()
        assert reg.content_hash("a") == old
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            body = {"model": "tiny@a", "prompt": "x", "vllm_xargs": {"neuron_set_hash": old}}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200
            assert r.json()["vllm_xargs"] == {"neuron_set_hash": old, "neuron_set": "a"}
            await reg.put(ns("a", (3,)))  # other neurons, same name
            new = reg.content_hash("a")
            assert new == ns("a", (3,)).content_hash() != old
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 409 and r.json()["error"]["type"] == "ConflictError"
            assert f"now has content hash {new}, the request expected {old}" in r.json()["error"]["message"]
            r = await c.post("/v1/completions", json={**body, "vllm_xargs": {"neuron_set_hash": new}})
            assert r.status_code == 200
        assert dict(reg.in_flight) == {}

    asyncio.run(main())


def test_the_loglikelihood_route_gets_the_set_selection_and_clients_cannot_send_internal_keys():
    from server.schemas import LOGLIKELIHOOD_PATH as PATH
    from vllm_negablate.runtime import PROMPT_LOGPROBS_FROM_KEY

    async def main():
        asgi, engine, reg = make_app()
        await reg.startup()
        await reg.put(ns("a"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            r = await c.post(PATH, json={"model": "tiny@a", "items": []})
            assert r.status_code == 200 and r.json()["model"] == "tiny"
            assert r.json()["vllm_xargs"] == {"neuron_set": "a", "neuron_set_hash": reg.content_hash("a")}
            r = await c.post(PATH, json={"model": "tiny@nope", "items": []})
            assert r.status_code == 404
            for path in ("/v1/completions", PATH):
                r = await c.post(path, json={"model": "tiny@a", "prompt": "x",
                                             "vllm_xargs": {PROMPT_LOGPROBS_FROM_KEY: 3}})
                assert r.status_code == 400 and PROMPT_LOGPROBS_FROM_KEY in r.json()["error"]["message"]
        assert dict(reg.in_flight) == {}  # nothing held after a refusal

    asyncio.run(main())


def test_a_requests_prompts_get_one_content_while_the_set_is_replaced_or_the_default_moves():
    """vLLM admits the prompts of one request one by one; whatever control calls land
    meanwhile, they all expect the content held when the request arrived: the default is
    resolved once, a replacing upload waits for the request, a later request gets the new
    content, and a request naming no set while the default is being deleted gets none."""
    async def main():
        asgi, engine, reg = make_app(max_resident=2, wait_timeout=2.0)
        await reg.startup()
        await reg.put(ns("a"))
        await reg.put(ns("b", (2,)))
        await reg.set_default("a")
        old = reg.content_hash("a")
        engine.hold = True
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://t") as c:
            running = asyncio.create_task(c.post("/v1/completions", json={"model": "tiny", "prompt": ["x", "y"]}))
            await asyncio.sleep(0.05)
            assert reg.in_flight["a"] == 1
            await reg.set_default("b")  # the running request keeps a
            upload = asyncio.create_task(reg.put(ns("a", (3,))))
            await asyncio.sleep(0.05)
            assert not upload.done() and reg.content_hash("a") == old  # waits for the request
            engine.release.set()
            r = await running
            assert r.json()["vllm_xargs"] == {"neuron_set": "a", "neuron_set_hash": old}
            await upload
            new = reg.content_hash("a")
            assert new == ns("a", (3,)).content_hash() != old
            r = await c.post("/v1/completions", json={"model": "tiny@a", "prompt": ["x", "y"]})
            assert r.json()["vllm_xargs"] == {"neuron_set": "a", "neuron_set_hash": new}
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert r.json()["vllm_xargs"] == {"neuron_set": "b", "neuron_set_hash": reg.content_hash("b")}
            # the default (b) being deleted while a request uses it: a request naming no set gets none
            engine.hold, engine.release = True, asyncio.Event()
            using_b = asyncio.create_task(c.post("/v1/completions", json={"model": "tiny@b", "prompt": "x"}))
            await asyncio.sleep(0.05)
            deleting = asyncio.create_task(reg.delete("b"))
            await asyncio.sleep(0.05)
            engine.hold = False
            r = await c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 200 and r.json()["vllm_xargs"] == {"neuron_set": "none"}
            engine.release.set()
            assert (await using_b).status_code == 200
            await deleting
        assert reg.default is None and dict(reg.in_flight) == {}

    asyncio.run(main())
