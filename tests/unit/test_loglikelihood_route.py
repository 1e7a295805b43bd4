"""``/v1/negablate/loglikelihood`` in process, the engine replaced by a fake that records
what each item asks for: every item of a request is pinned to the same set content (the
named set, else the default at the time, else ``none``), a set replaced while the items
are admitted gives 409 instead of a mix, and the sums and ``is_greedy`` come from the rows.
(Against a live engine and the oracle: ``tests/e2e/test_loglikelihood.py``.)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import server.loglikelihood as route
from server.schemas import LOGLIKELIHOOD_PATH


class FakeRegistry:
    def __init__(self, hashes: dict[str, str], default: str | None = None) -> None:
        self.hashes = dict(hashes)
        self.default = default

    @property
    def sets(self) -> dict[str, object]:
        return dict.fromkeys(self.hashes)

    def content_hash(self, name: str) -> str:
        return self.hashes[name]


@pytest.fixture
def app(monkeypatch):
    asked: list[dict] = []
    registry = FakeRegistry({"a": "hash-a", "d": "hash-d"})
    replace_after: list[int] = []  # replace set "a" once this many items were admitted

    async def continuation_logprobs(state, token_ids, first, extra_args, request_id):
        asked.append(dict(extra_args))
        if replace_after and len(asked) == replace_after[0]:
            registry.hashes["a"] = "hash-a2"
        name, pinned = extra_args.get("neuron_set"), extra_args.get("neuron_set_hash")
        if pinned is not None and registry.hashes.get(name) != pinned:  # the engine's hash check
            return [(float("nan"), -1) for _ in token_ids[first:]]
        return [(-0.5 * (i + 1), 1 if t % 2 == 0 else 2) for i, t in enumerate(token_ids[first:])]

    monkeypatch.setattr(route.vllm_adapter, "serves_model", lambda state, name: name == "tiny")
    monkeypatch.setattr(route.vllm_adapter, "served_limits", lambda state: (64, 100))
    monkeypatch.setattr(route.vllm_adapter, "continuation_logprobs", continuation_logprobs)
    api = FastAPI()
    api.include_router(route.router)
    api.state.negablate = registry
    return TestClient(api), asked, registry, replace_after


def _post(client, xargs=None, n=3):
    items = [{"context": [1, 2], "continuation": [4, 6]}, {"context": [1], "continuation": [4, 5, 8]}] * n
    body = {"model": "tiny", "items": items, **({"vllm_xargs": xargs} if xargs else {})}
    return client.post(LOGLIKELIHOOD_PATH, json=body)


def test_every_item_is_pinned_to_the_named_sets_content(app):
    client, asked, _, _ = app
    r = _post(client, {"neuron_set": "a"})
    assert r.status_code == 200, r.text
    assert asked == [{"neuron_set": "a", "neuron_set_hash": "hash-a"}] * 6
    body = r.json()
    assert (body["neuron_set"], body["content_hash"]) == ("a", "hash-a")
    first, second = body["data"][:2]
    assert (first["logprob"], first["is_greedy"], first["token_logprobs"]) == (-1.5, True, [-0.5, -1.0])
    assert (second["logprob"], second["is_greedy"]) == (-3.0, False)  # token 5 ranked second
    assert [d["index"] for d in body["data"]] == list(range(6))


def test_the_default_is_resolved_once_and_none_is_explicit(app):
    client, asked, registry, _ = app
    registry.default = "d"
    assert _post(client).json()["neuron_set"] == "d"
    assert asked == [{"neuron_set": "d", "neuron_set_hash": "hash-d"}] * 6
    asked.clear()
    registry.default = None
    r = _post(client)
    assert (r.json()["neuron_set"], r.json()["content_hash"]) == ("none", None)
    assert asked == [{"neuron_set": "none"}] * 6  # a default set later cannot reach these


def test_a_set_replaced_mid_request_is_a_409_never_a_mix(app):
    client, asked, _, replace_after = app
    replace_after.append(2)
    r = _post(client, {"neuron_set": "a"})
    assert r.status_code == 409, r.text
    assert "hash-a -> hash-a2" in r.json()["error"]["message"]
    asked.clear()
    r = _post(client, {"neuron_set": "a"})  # the retry scores the new content throughout
    assert r.status_code == 200 and r.json()["content_hash"] == "hash-a2"
    assert {a["neuron_set_hash"] for a in asked} == {"hash-a2"}
