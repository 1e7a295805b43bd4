"""The one retrying transport (server.http), GET /v1/models, and the shared completions body/parser.

Every test runs against an ``httpx.MockTransport`` that answers a scripted list of
statuses (or raises), with the sleep replaced by a recorder: no network, no waiting.
The sync and async transports are run through the same cases.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from server.client import SERVER_DEFAULT, NegablateAPIError, NegablateClient
from server.completions import CompletionsFormatError, parse_prompt_logprobs, prompt_logprob_body
from server.http import (
    RETRY_STATUS,
    AsyncRetryTransport,
    ModelListError,
    RetryEvent,
    RetryPolicy,
    RetryTransport,
    alist_models,
    list_models,
    models_url,
)

URL = "http://srv.test/v1/models"


class Script:
    """Answers the statuses in ``plan`` in turn (an exception instance is raised), then 200."""

    def __init__(self, plan: list[int | Exception], headers: dict[str, str] | None = None,
                 ok: Callable[[httpx.Request], httpx.Response] | None = None) -> None:
        self.plan = list(plan)
        self.headers = headers or {}
        self.ok = ok or (lambda request: httpx.Response(200, json={"ok": True}))
        self.calls = 0
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.requests.append(request)
        if self.plan:
            step = self.plan.pop(0)
            if isinstance(step, Exception):
                raise step
            return httpx.Response(step, headers=self.headers, json={"error": {"message": f"status {step}"}})
        return self.ok(request)


def fetch(mode: str, script: Script, policy: RetryPolicy, *, method: str = "GET",
          events: list[RetryEvent] | None = None) -> tuple[httpx.Response, list[float], int]:
    """One request through the sync or async retrying transport: (response, delays slept, n_retries)."""
    slept: list[float] = []
    hook = events.append if events is not None else None
    if mode == "sync":
        t = RetryTransport(httpx.MockTransport(script), policy, on_retry=hook, sleep=slept.append)
        with httpx.Client(transport=t) as client:
            r = client.request(method, URL, json={"x": 1} if method == "POST" else None)
        return r, slept, t.n_retries

    async def record(delay: float) -> None:
        slept.append(delay)

    async def main() -> tuple[httpx.Response, int]:
        at = AsyncRetryTransport(httpx.MockTransport(script), policy, on_retry=hook, sleep=record)
        async with httpx.AsyncClient(transport=at) as client:
            r = await client.request(method, URL, json={"x": 1} if method == "POST" else None)
        return r, at.n_retries

    r, n = asyncio.run(main())
    return r, slept, n


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


# --------------------------------------------------------------------------- the policy


def test_policy_statuses_and_delays():
    assert RETRY_STATUS == {408, 425, 429, 500, 502, 503, 504}
    assert 409 not in RETRY_STATUS  # "delete conflicts with running requests": not transient
    p = RetryPolicy(max_retries=3, backoff=1.0, max_backoff=5.0)
    for attempt, full in [(0, 1.0), (1, 2.0), (2, 4.0), (3, 5.0), (9, 5.0)]:
        d = p.delay(attempt)
        assert full / 2 <= d <= full  # jitter scales by [0.5, 1]
    assert 2.5 <= p.delay(0, "7") <= 5.0  # raised to Retry-After (7), capped at max_backoff (5)
    assert 1.0 <= RetryPolicy(backoff=0.01).delay(0, "2") <= 2.0
    assert p.delay(0, "soon") <= 1.0 and p.delay(0, "-3") <= 1.0 and p.delay(0, "nan") <= 1.0
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


# --------------------------------------------------------------------------- the transports


@MODES
def test_retries_503_then_200_and_counts(mode):
    script = Script([503, 503])
    events: list[RetryEvent] = []
    r, slept, n = fetch(mode, script, RetryPolicy(max_retries=5, backoff=0.01), method="POST", events=events)
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert script.calls == 3 and n == 2 and len(slept) == 2
    assert 0.005 <= slept[0] <= 0.01 and 0.01 <= slept[1] <= 0.02  # exponential, with jitter
    assert [(e.attempt, e.status, e.error) for e in events] == [(0, 503, None), (1, 503, None)]
    assert [json.loads(q.content) for q in script.requests] == [{"x": 1}] * 3  # the body is resent


@MODES
def test_retry_after_is_honoured_and_capped(mode):
    r, slept, n = fetch(mode, Script([429], {"Retry-After": "2"}), RetryPolicy(backoff=0.01, max_backoff=30))
    assert r.status_code == 200 and n == 1 and 1.0 <= slept[0] <= 2.0
    r, slept, n = fetch(mode, Script([503], {"Retry-After": "60"}), RetryPolicy(backoff=0.01, max_backoff=3))
    assert r.status_code == 200 and 1.5 <= slept[0] <= 3.0


@MODES
@pytest.mark.parametrize("status", [409, 404, 400, 401, 422])
def test_client_errors_and_409_are_not_retried(mode, status):
    script = Script([status])
    r, slept, n = fetch(mode, script, RetryPolicy(backoff=0.01))
    assert r.status_code == status and r.json()["error"]["message"] == f"status {status}"
    assert script.calls == 1 and n == 0 and slept == []


@MODES
def test_gives_up_after_max_retries_with_the_last_response(mode):
    script = Script([503, 502, 500, 504, 503])
    r, slept, n = fetch(mode, script, RetryPolicy(max_retries=3, backoff=0.01))
    assert r.status_code == 504 and r.json()["error"]["message"] == "status 504"  # readable
    assert script.calls == 4 and n == 3 and len(slept) == 3
    r, _, n = fetch(mode, Script([503]), RetryPolicy(max_retries=0))
    assert r.status_code == 503 and n == 0


@MODES
def test_transport_errors_are_retried_then_raised(mode):
    script = Script([httpx.ConnectError("refused"), httpx.ReadTimeout("slow")])
    events: list[RetryEvent] = []
    r, _, n = fetch(mode, script, RetryPolicy(backoff=0.01), events=events)
    assert r.status_code == 200 and script.calls == 3 and n == 2
    assert [type(e.error) for e in events] == [httpx.ConnectError, httpx.ReadTimeout]
    assert all(e.status is None for e in events)
    script = Script([httpx.ConnectError("refused")] * 9)
    with pytest.raises(httpx.ConnectError, match="refused"):
        fetch(mode, script, RetryPolicy(max_retries=2, backoff=0.01))
    assert script.calls == 3


def test_a_callers_transport_is_closed_only_when_asked():
    closed = []

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            closed.append(True)

    RetryTransport(Inner(Script([])), close_inner=False).close()
    assert closed == []
    RetryTransport(Inner(Script([]))).close()
    assert closed == [True]


# --------------------------------------------------------------------------- /v1/models


def cards_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"object": "list", "data": [
        {"id": "tiny", "max_model_len": 64, "auth": request.headers.get("authorization")},
        {"id": "tiny@A"}]})


def test_list_models_sync_and_async():
    script = Script([503], ok=cards_ok)
    cards = list_models("http://srv.test/v1/", "k", transport=httpx.MockTransport(script),
                        policy=RetryPolicy(backoff=0.001))
    assert [c["id"] for c in cards] == ["tiny", "tiny@A"] and cards[0]["auth"] == "Bearer k"
    assert script.calls == 2 and str(script.requests[0].url) == URL
    script = Script([], ok=cards_ok)
    cards = asyncio.run(alist_models("http://srv.test", transport=httpx.MockTransport(script)))
    assert cards[0]["max_model_len"] == 64 and cards[0]["auth"] is None
    assert models_url("http://h:1") == models_url("http://h:1/v1") == "http://h:1/v1/models"


def test_list_models_errors_are_clear():
    with pytest.raises(ModelListError) as info:
        list_models("http://srv.test", transport=httpx.MockTransport(Script([404])))
    e = info.value
    assert isinstance(e, RuntimeError) and e.status == 404 and e.url == URL
    assert str(e).startswith(f"{URL} answered 404: ") and e.reason.startswith("answered 404")
    with pytest.raises(ModelListError, match=f"cannot reach {URL}: refused") as info:
        list_models("http://srv.test", transport=httpx.MockTransport(Script([httpx.ConnectError("refused")] * 3)),
                    policy=RetryPolicy(max_retries=2, backoff=0.001))
    assert info.value.status is None
    bad = httpx.MockTransport(lambda r: httpx.Response(200, json={"data": [{"name": "x"}]}))
    with pytest.raises(ModelListError, match="not a model list"):
        list_models("http://srv.test", transport=bad)
    html = httpx.MockTransport(lambda r: httpx.Response(200, text="<html>"))
    with pytest.raises(ModelListError, match="not a model list"):
        asyncio.run(alist_models("http://srv.test", transport=html))


# --------------------------------------------------------------------------- completions body/parser


def test_body_and_parser():
    body = prompt_logprob_body("m@A", [[2, 5, 7]], 0, {"vllm_xargs": {"k": 1}, "echo": False})
    assert body == {"vllm_xargs": {"k": 1}, "model": "m@A", "prompt": [[2, 5, 7]], "echo": True,
                    "logprobs": 0, "max_tokens": 0, "temperature": 0}
    assert prompt_logprob_body("m", [[2]], logprobs=1)["logprobs"] == 1
    data = {"choices": [
        {"index": 1, "logprobs": {"token_logprobs": [None, -1.0, -2.0, -0.5], "tokens": ["a", "b", "c", "g"]}},
        {"index": 0, "logprobs": {"token_logprobs": [None, -3.0], "tokens": ["x", "y"]}},
    ]}
    got = parse_prompt_logprobs(data, [[1, 2], [3, 4, 5]], max_tokens=1)
    assert [g.logprobs for g in got] == [[None, -3.0], [None, -1.0, -2.0]]  # generated token dropped
    assert [g.tokens for g in got] == [["x", "y"], ["a", "b", "c"]]
    with pytest.raises(CompletionsFormatError, match="token logprobs for a prompt of"):
        parse_prompt_logprobs(data, [[1, 2], [3, 4]], max_tokens=0)
    with pytest.raises(CompletionsFormatError, match="expected 3 choices, got 2"):
        parse_prompt_logprobs(data, [[1], [2], [3]])
    with pytest.raises(CompletionsFormatError, match="is null"):
        parse_prompt_logprobs({"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, None]}}]}, [[1, 2]])
    strings = parse_prompt_logprobs({"choices": [{"index": 0, "logprobs": {"token_logprobs": [None, -1.5]}}]}, ["hi"])
    assert strings[0].logprobs == [None, -1.5] and strings[0].tokens is None


# --------------------------------------------------------------------------- the typed client


class FakeServer:
    """/v1/models and an echoing /v1/completions, with scripted failures on completions."""

    def __init__(self, fail: list[int] | None = None, retry_after: str | None = None) -> None:
        self.fail = list(fail or [])
        self.retry_after = retry_after
        self.bodies: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return cards_ok(request)
        if request.url.path == "/v1/neuron-sets/busy":
            return httpx.Response(409, json={"error": {"message": "in use by running requests"}})
        body = json.loads(request.content)
        self.bodies.append(body)
        if self.fail:
            headers = {"Retry-After": self.retry_after} if self.retry_after else {}
            return httpx.Response(self.fail.pop(0), headers=headers, json={"error": {"message": "busy"}})
        choices = [{"index": i, "logprobs": {
            "token_logprobs": [None] + [-0.5 * j for j in range(1, len(p))],
            "tokens": [f"t{t}" for t in p]}} for i, p in enumerate(body["prompt"])]
        return httpx.Response(200, json={"choices": choices[::-1]})


def test_client_score_shares_the_scorers_body_and_retries():
    fake = FakeServer(fail=[503, 429], retry_after="0")
    with NegablateClient("http://srv.test", transport=httpx.MockTransport(fake), backoff=0.001) as c:
        rows = c.score([[2, 5, 7], [2, 9]])
        assert c.n_retries == 2 and len(fake.bodies) == 3
        assert fake.bodies[-1] == prompt_logprob_body("tiny@none", [[2, 5, 7], [2, 9]], 0)
        assert [r.logprobs for r in rows] == [[None, -0.5, -1.0], [None, -0.5]]
        assert rows[0].tokens == ["t2", "t5", "t7"] and rows[0].token_ids == [2, 5, 7]
        assert rows[0].total == -1.5
        c.score([[2, 5]], SERVER_DEFAULT)
        c.score([[2, 5]], "A", use_xargs=True)
        c.score([[2, 5]], "A")
        assert [(b["model"], b.get("vllm_xargs")) for b in fake.bodies[-3:]] == [
            ("tiny", None), ("tiny", {"neuron_set": "A"}), ("tiny@A", None)]
        with pytest.raises(NegablateAPIError) as info:  # 409 is final: no retry
            c.delete_set("busy")
        assert info.value.status == 409 and c.n_retries == 2


def test_client_gives_up_with_the_servers_error():
    fake = FakeServer(fail=[503] * 5)
    with NegablateClient("http://srv.test", model="tiny", transport=httpx.MockTransport(fake),
                         max_retries=2, backoff=0.001) as c:
        with pytest.raises(NegablateAPIError) as info:
            c.score([[2, 5]])
        assert info.value.status == 503 and info.value.message == "busy"
        assert c.n_retries == 2 and len(fake.bodies) == 3 and c.max_retries == 2
