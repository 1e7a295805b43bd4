"""Typed HTTP client for `negablate serve` (httpx only: no vLLM, no torch).

    from server.client import NegablateClient
    with NegablateClient("http://127.0.0.1:8000", admin_key="...") as c:
        c.upload_set(NeuronSet.load("wasserstein-top1.json"))
        base = c.score([[2, 651, 3797, 603]])                     # no ablation
        abl = c.score([[2, 651, 3797, 603]], neuron_set="wasserstein-top1")
        c.set_default("wasserstein-top1")

``neuron_set=None`` always means *no ablation* (sent as ``BASE@none``), even
while the server has a default set; pass :data:`SERVER_DEFAULT` to get whatever
the default is. Answers 429 and 503 (a set waiting for a resident slot) are
retried with backoff, honouring ``Retry-After``. Other errors from the server
are raised as :class:`NegablateAPIError` carrying the HTTP status and the
OpenAI-style error message.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any, Final

import httpx
from pydantic import BaseModel

from server.schemas import AblationState, NeuronSetList, NeuronSetSummary
from vllm_negablate.neuron_set import NO_ABLATION, NeuronSet

RETRY_STATUS = frozenset({429, 503})


class _ServerDefault:
    def __repr__(self) -> str:
        return "SERVER_DEFAULT"


SERVER_DEFAULT: Final = _ServerDefault()
"""Select no set in a request, so the server's default set (if any) applies."""


class NegablateAPIError(RuntimeError):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class ScoredPrompt(BaseModel):
    """Per-token log-probabilities of one prompt (first token: None)."""

    token_ids: list[int] | None = None
    tokens: list[str]
    logprobs: list[float | None]

    @property
    def total(self) -> float:
        return sum(x for x in self.logprobs if x is not None)


class ABResult(BaseModel):
    a: list[ScoredPrompt]
    b: list[ScoredPrompt]

    def deltas(self) -> list[float]:
        """Summed log-prob difference b - a per prompt."""
        return [y.total - x.total for x, y in zip(self.a, self.b, strict=True)]


class NegablateClient:
    def __init__(
        self,
        base_url: str,
        *,
        admin_key: str | None = None,
        api_key: str | None = None,
        model: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport)
        self.admin_key = admin_key
        self.api_key = api_key
        self._model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.n_retries = 0

    def __enter__(self) -> NegablateClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------- plumbing
    def _request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> Any:
        key = self.admin_key if admin else self.api_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for attempt in range(self.max_retries + 1):
            response = self._http.request(method, path, headers=headers, **kwargs)
            if response.status_code not in RETRY_STATUS or attempt == self.max_retries:
                break
            self.n_retries += 1
            time.sleep(self._delay(attempt, response.headers.get("retry-after")))
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body)
            except Exception:
                body, message = response.text, response.text
            raise NegablateAPIError(response.status_code, message, body)
        return response.json()

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt)
        if retry_after:
            try:
                delay = min(self.max_backoff, max(delay, float(retry_after)))
            except ValueError:
                pass
        return delay * (0.75 + random.random() / 4)

    @property
    def model(self) -> str:
        """The served base model (first of /v1/models without '@')."""
        if self._model is None:
            ids = [m["id"] for m in self._request("GET", "/v1/models")["data"]]
            self._model = next(i for i in ids if "@" not in i)
        return self._model

    # --------------------------------------------------------------- control
    def list_sets(self) -> NeuronSetList:
        return NeuronSetList.model_validate(self._request("GET", "/v1/neuron-sets", admin=True))

    def upload_set(self, neuron_set: NeuronSet) -> NeuronSetSummary:
        """Upload (or replace) a set; the server validates it against the model."""
        data = self._request("PUT", f"/v1/neuron-sets/{neuron_set.name}", admin=True,
                             json=neuron_set.model_dump(mode="json"))
        return NeuronSetSummary.model_validate(data)

    def get_set(self, name: str) -> NeuronSet:
        return NeuronSet.model_validate(self._request("GET", f"/v1/neuron-sets/{name}", admin=True))

    def delete_set(self, name: str) -> None:
        self._request("DELETE", f"/v1/neuron-sets/{name}", admin=True)

    def set_default(self, name: str | None) -> AblationState:
        return AblationState.model_validate(
            self._request("PUT", "/v1/ablation/default", admin=True, json={"name": name})
        )

    def state(self) -> AblationState:
        return AblationState.model_validate(self._request("GET", "/v1/ablation", admin=True))

    # --------------------------------------------------------------- scoring
    def score(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        neuron_set: str | None | _ServerDefault = None,
        *,
        use_xargs: bool = False,
    ) -> list[ScoredPrompt]:
        """Prompt log-probabilities via ``/v1/completions`` (echo, logprobs, max_tokens 0).

        ``neuron_set``: a set name; ``None`` for no ablation (``BASE@none``, whatever
        the server's default); :data:`SERVER_DEFAULT` for the server's default set.
        Token-id prompts are scored as given (prepend BOS yourself); with
        ``use_xargs`` the set travels in ``vllm_xargs`` instead of ``BASE@SET``.
        """
        model = self.model
        as_ids = bool(prompts) and not isinstance(prompts[0], str)
        body: dict[str, Any] = {
            "prompt": [list(p) for p in prompts] if as_ids else list(prompts),
            "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0.0,
        }
        selector = None if neuron_set is SERVER_DEFAULT else (neuron_set or NO_ABLATION)
        if selector is not None and use_xargs:
            body["vllm_xargs"] = {"neuron_set": selector}
        elif selector is not None:
            model = f"{model}@{selector}"
        body["model"] = model
        data = self._request("POST", "/v1/completions", json=body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        out = []
        for prompt, choice in zip(prompts, choices, strict=True):
            lp = choice["logprobs"]
            out.append(ScoredPrompt(
                token_ids=None if isinstance(prompt, str) else list(prompt),
                tokens=lp["tokens"], logprobs=lp["token_logprobs"],
            ))
        return out

    def ab(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        set_a: str | None | _ServerDefault,
        set_b: str | None | _ServerDefault,
    ) -> ABResult:
        """Score the same prompts under two conditions (``None``: no ablation, always)."""
        return ABResult(a=self.score(prompts, set_a), b=self.score(prompts, set_b))
