"""One retrying HTTP transport for every call to an OpenAI-compatible server (httpx only).

The typed client (:mod:`server.client`), the eval scorer (:mod:`eval.scoring`) and
the analyses all talk to ``negablate serve`` (or plain vLLM) over HTTP, and all meet
the same transient answers: a connection refused while the server starts, a
timeout, ``429``, a ``503`` while a neuron set waits for a resident slot (with
``Retry-After``), a ``5xx`` from a proxy. The retry therefore lives *below*
``httpx.Client``, in a transport: every caller keeps its own error handling for the
final answer, and the policy is written once.

    transport = RetryTransport(policy=RetryPolicy(max_retries=3))
    with httpx.Client(base_url=url, transport=transport) as client:
        client.get("/v1/models")
    transport.n_retries                      # retries made, for a run's stats

Retried: :class:`httpx.TransportError` (connection errors, timeouts; the error is
raised once the retries are spent) and the statuses in :data:`RETRY_STATUS` (the
last response is returned once the retries are spent). ``409`` is *not* retried:
on this server it means a delete conflicts with running requests, which waiting a
few seconds does not reliably fix and the caller must decide about. A retried
request is sent again as it was, so its body must be replayable (``json=`` and
``content=`` bodies are; a generator is not).

:func:`list_models` is ``GET /v1/models`` through this transport, with one
error type (:class:`ModelListError`) for every way it can fail.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

__all__ = [
    "RETRY_STATUS",
    "AsyncRetryTransport",
    "ModelListError",
    "RetryEvent",
    "RetryPolicy",
    "RetryTransport",
    "alist_models",
    "auth_headers",
    "list_models",
    "models_url",
    "parse_model_list",
]

RETRY_STATUS: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses worth asking again: timeouts, rate limits, a busy or restarting server."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait before asking again.

    The delay before retry ``attempt`` (0-based) is ``backoff * 2**attempt``, raised to
    the answer's ``Retry-After`` (seconds) when it has one, capped at ``max_backoff``,
    then scaled by a random factor in [0.5, 1] so that concurrent clients spread out.
    """

    max_retries: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    retry_status: frozenset[int] = RETRY_STATUS

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoff and max_backoff must be >= 0")

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based), jitter included."""
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        wait = _retry_after_seconds(retry_after)
        if wait is not None:
            delay = min(self.max_backoff, max(delay, wait))
        return delay * (0.5 + random.random() / 2)


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` in seconds; ``None`` if absent or not a finite number >= 0
    (the HTTP-date form is not used by vLLM or this server)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


@dataclass(frozen=True)
class RetryEvent:
    """One retry about to happen, as handed to an ``on_retry`` hook."""

    request: httpx.Request
    attempt: int  # the failed attempt, 0-based
    delay: float  # seconds until the next one
    status: int | None  # the status answered, None for a transport error
    error: Exception | None  # the transport error, None for a status


class _Retrying:
    """The decision shared by the sync and async transports."""

    def __init__(self, policy: RetryPolicy | None, on_retry: Callable[[RetryEvent], None] | None) -> None:
        self.policy = policy if policy is not None else RetryPolicy()
        self.on_retry = on_retry
        self.n_retries = 0  # retries made through this transport, all requests together

    def _next_delay(
        self, request: httpx.Request, attempt: int,
        response: httpx.Response | None, error: Exception | None,
    ) -> float | None:
        """Seconds to wait before another attempt, or ``None`` to stop here."""
        if attempt >= self.policy.max_retries:
            return None
        if response is not None and response.status_code not in self.policy.retry_status:
            return None
        retry_after = response.headers.get("retry-after") if response is not None else None
        delay = self.policy.delay(attempt, retry_after)
        self.n_retries += 1
        if self.on_retry is not None:
            self.on_retry(RetryEvent(request, attempt, delay,
                                     response.status_code if response is not None else None, error))
        return delay


class RetryTransport(_Retrying, httpx.BaseTransport):
    """A sync transport that retries transient failures of ``inner`` (see the module).

    ``inner`` defaults to a fresh :class:`httpx.HTTPTransport`; it is closed with this
    transport unless ``close_inner`` is false (a transport the caller keeps using).
    ``sleep`` replaces :func:`time.sleep` (tests).
    """

    def __init__(
        self, inner: httpx.BaseTransport | None = None, policy: RetryPolicy | None = None, *,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], None] | None = None, close_inner: bool = True,
    ) -> None:
        super().__init__(policy, on_retry)
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self._sleep = sleep
        self._close_inner = close_inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self.inner.handle_request(request)
            except httpx.TransportError as e:  # timeouts included
                delay = self._next_delay(request, attempt, None, e)
                if delay is None:
                    raise
            else:
                delay = self._next_delay(request, attempt, response, None)
                if delay is None:
                    return response
                response.close()
            (self._sleep or time.sleep)(delay)
            attempt += 1

    def close(self) -> None:
        if self._close_inner:
            self.inner.close()


class AsyncRetryTransport(_Retrying, httpx.AsyncBaseTransport):
    """The async twin of :class:`RetryTransport` (same policy, same counter).

    ``inner`` defaults to a fresh :class:`httpx.AsyncHTTPTransport`; ``sleep``
    replaces :func:`asyncio.sleep` (looked up at each call, so patching it works).
    """

    def __init__(
        self, inner: httpx.AsyncBaseTransport | None = None, policy: RetryPolicy | None = None, *,
        on_retry: Callable[[RetryEvent], None] | None = None,
        sleep: Callable[[float], Awaitable[Any]] | None = None, close_inner: bool = True,
    ) -> None:
        super().__init__(policy, on_retry)
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self._sleep = sleep
        self._close_inner = close_inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self.inner.handle_async_request(request)
            except httpx.TransportError as e:  # timeouts included
                delay = self._next_delay(request, attempt, None, e)
                if delay is None:
                    raise
            else:
                delay = self._next_delay(request, attempt, response, None)
                if delay is None:
                    return response
                await response.aclose()
            await (self._sleep or asyncio.sleep)(delay)
            attempt += 1

    async def aclose(self) -> None:
        if self._close_inner:
            await self.inner.aclose()


# --------------------------------------------------------------------------- /v1/models


class ModelListError(RuntimeError):
    """``GET /v1/models`` failed: no answer (``status`` None), an error status, or not a
    model list. ``str()`` names the URL; ``reason`` is the same without it."""

    def __init__(self, url: str, reason: str, status: int | None = None, *, message: str | None = None) -> None:
        super().__init__(message or f"{url}: {reason}")
        self.url = url
        self.reason = reason
        self.status = status


def auth_headers(api_key: str | None) -> dict[str, str]:
    """``Authorization: Bearer KEY`` (vLLM's ``--api-key`` guards /v1 routes), or nothing."""
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def normalize_base_url(url: str) -> str:
    """``http://h:p``, ``http://h:p/``, ``http://h:p/v1`` and ``.../v1/completions``
    all become ``http://h:p`` (no trailing slash); the API paths are added here."""
    u = url.strip().rstrip("/")
    for suffix in ("/v1/completions", "/v1"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    if not u.startswith(("http://", "https://")):
        u = "http://" + u
    return u


def models_url(base_url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` -> ``http://h:p/v1/models``."""
    return f"{normalize_base_url(base_url)}/v1/models"


def parse_model_list(data: Any, url: str) -> list[dict[str, Any]]:
    """The model cards of a ``/v1/models`` answer, each a dict with a string ``id``."""
    cards = data.get("data") if isinstance(data, dict) else None
    if not isinstance(cards, list) or not all(
        isinstance(c, dict) and isinstance(c.get("id"), str) for c in cards
    ):
        raise ModelListError(url, f"not a model list: {str(data)[:200]!r}")
    return cards


def _unreachable(url: str, error: httpx.HTTPError) -> ModelListError:
    return ModelListError(url, str(error), message=f"cannot reach {url}: {error}")


def _from_response(response: httpx.Response, url: str) -> list[dict[str, Any]]:
    if response.status_code != 200:
        reason = f"answered {response.status_code}: {response.text[:300]}"
        raise ModelListError(url, reason, response.status_code, message=f"{url} {reason}")
    try:
        data = response.json()
    except ValueError:
        data = response.text
    return parse_model_list(data, url)


def list_models(
    base_url: str, api_key: str | None = None, *, transport: httpx.BaseTransport | None = None,
    timeout: float = 30.0, policy: RetryPolicy | None = None,
) -> list[dict[str, Any]]:
    """The model cards a server lists in ``GET /v1/models``, retried as in the module.

    ``transport``: an inner transport to wrap (tests; not closed here). Raises
    :class:`ModelListError` when the server cannot be reached, answers an error
    status, or answers something that is not a model list.
    """
    url = models_url(base_url)
    retrying = RetryTransport(transport, policy, close_inner=transport is None)
    try:
        with httpx.Client(transport=retrying, timeout=timeout,
                          headers=auth_headers(api_key)) as client:
            response = client.get(url)
    except httpx.HTTPError as e:
        raise _unreachable(url, e) from e
    return _from_response(response, url)


async def alist_models(
    base_url: str, api_key: str | None = None, *, transport: httpx.AsyncBaseTransport | None = None,
    timeout: float = 30.0, policy: RetryPolicy | None = None,
) -> list[dict[str, Any]]:
    """:func:`list_models` for async callers (an ``httpx.AsyncBaseTransport`` to wrap)."""
    url = models_url(base_url)
    retrying = AsyncRetryTransport(transport, policy, close_inner=transport is None)
    try:
        async with httpx.AsyncClient(transport=retrying, timeout=timeout,
                                     headers=auth_headers(api_key)) as client:
            response = await client.get(url)
    except httpx.HTTPError as e:
        raise _unreachable(url, e) from e
    return _from_response(response, url)
