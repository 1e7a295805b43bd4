"""Typed HTTP client for `negablate serve` (httpx only: no vLLM, no torch).

    from server.client import NegablateClient
    with NegablateClient("http://127.0.0.1:8000", admin_key="...") as c:
        c.upload_set(NeuronSet.load("wasserstein-top1.json"))
        base = c.score([[2, 651, 3797, 603]])                     # no ablation
        abl = c.score([[2, 651, 3797, 603]], neuron_set="wasserstein-top1")
        c.set_default("wasserstein-top1")

``neuron_set=None`` always means *no ablation* (sent as ``BASE@none``), even
while the server has a default set; pass :data:`SERVER_DEFAULT` to get whatever
the default is. Transient failures (connection errors, timeouts, 429, a 503
while a set waits for a resident slot, other 5xx; see :mod:`server.http`) are
retried with backoff, honouring ``Retry-After``, by the same transport the eval
harness uses; ``n_retries`` counts them. Other errors from the server are raised
as :class:`NegablateAPIError` carrying the HTTP status and the OpenAI-style error
message. :meth:`NegablateClient.score` sends the same request and reads the answer
with the same code as :class:`eval.scoring.CompletionsScorer`
(:mod:`server.completions`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import httpx
from pydantic import BaseModel

from server.completions import parse_prompt_logprobs, prompt_logprob_body
from server.http import RETRY_STATUS, RetryPolicy, RetryTransport, auth_headers, parse_model_list
from server.schemas import (
    LOGLIKELIHOOD_PATH,
    AblationState,
    LoglikelihoodItem,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    LoglikelihoodResult,
    NeuronSetList,
    NeuronSetSummary,
)
from vllm_negablate.neuron_set import NO_ABLATION, NeuronSet

__all__ = [
    "RETRY_STATUS",
    "SERVER_DEFAULT",
    "ABResult",
    "NegablateAPIError",
    "NegablateClient",
    "ScoredPrompt",
]


class _ServerDefault:
    def __repr__(self) -> str:
        return "SERVER_DEFAULT"


SERVER_DEFAULT: Final = _ServerDefault()
"""Select no set in a request, so the server's default set (if any) applies."""


def _selector(neuron_set: str | None | _ServerDefault) -> str | None:
    """The set name a request sends: ``None`` -> ``none`` (no ablation, whatever the
    default), :data:`SERVER_DEFAULT` -> nothing (the server's default applies)."""
    return None if neuron_set is SERVER_DEFAULT else (neuron_set or NO_ABLATION)


class NegablateAPIError(RuntimeError):
    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class ScoredPrompt(BaseModel):
    """Per-token log-probabilities of one prompt (first token: None).

    ``tokens``: the server's token strings (empty if it sent none); ``token_ids``:
    the prompt as sent, for token-id prompts."""

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
    """The control API and prompt scoring of ``negablate serve``, over one retrying transport.

    ``max_retries`` / ``backoff`` / ``max_backoff``: the :class:`~server.http.RetryPolicy`;
    ``transport``: an inner ``httpx.BaseTransport`` to wrap (tests: ``httpx.MockTransport``).
    """

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
        self._transport = RetryTransport(
            transport, RetryPolicy(max_retries=max_retries, backoff=backoff, max_backoff=max_backoff)
        )
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=self._transport)
        self.admin_key = admin_key
        self.api_key = api_key
        self._model = model

    @property
    def policy(self) -> RetryPolicy:
        return self._transport.policy

    @property
    def max_retries(self) -> int:
        return self.policy.max_retries

    @property
    def backoff(self) -> float:
        return self.policy.backoff

    @property
    def max_backoff(self) -> float:
        return self.policy.max_backoff

    @property
    def n_retries(self) -> int:
        """Requests sent again after a transient failure, over this client's life."""
        return self._transport.n_retries

    def __enter__(self) -> NegablateClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------- plumbing
    def _request(self, method: str, path: str, *, admin: bool = False, **kwargs: Any) -> Any:
        headers = auth_headers(self.admin_key if admin else self.api_key)
        response = self._http.request(method, path, headers=headers, **kwargs)  # retried below httpx
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body["error"]["message"] if isinstance(body.get("error"), dict) else str(body)
            except Exception:
                body, message = response.text, response.text
            raise NegablateAPIError(response.status_code, message, body)
        return response.json()

    @property
    def model(self) -> str:
        """The served base model (first of /v1/models without '@')."""
        if self._model is None:
            cards = parse_model_list(self._request("GET", "/v1/models"), f"{self._http.base_url}v1/models")
            self._model = next(c["id"] for c in cards if "@" not in c["id"])
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
        """Prompt log-probabilities via ``/v1/completions`` (echo, logprobs 1, max_tokens 0).

        ``neuron_set``: a set name; ``None`` for no ablation (``BASE@none``, whatever
        the server's default); :data:`SERVER_DEFAULT` for the server's default set.
        Token-id prompts are scored as given (prepend BOS yourself); with
        ``use_xargs`` the set travels in ``vllm_xargs`` instead of ``BASE@SET``.
        The body and its reading are :mod:`server.completions`', as in the eval scorer;
        an answer of the wrong shape raises
        :class:`~server.completions.CompletionsFormatError`.
        """
        model = self.model
        extra: dict[str, Any] = {}
        selector = _selector(neuron_set)
        if selector is not None and use_xargs:
            extra["vllm_xargs"] = {"neuron_set": selector}
        elif selector is not None:
            model = f"{model}@{selector}"
        body = prompt_logprob_body(model, prompts, 0, extra)
        data = self._request("POST", "/v1/completions", json=body)
        return [
            ScoredPrompt(
                token_ids=None if isinstance(prompt, str) else [int(t) for t in prompt],
                tokens=scored.tokens if scored.tokens is not None else [],
                logprobs=scored.logprobs,
            )
            for prompt, scored in zip(prompts, parse_prompt_logprobs(data, prompts, 0), strict=True)
        ]

    def loglikelihood(
        self,
        items: Sequence[tuple[Sequence[int], Sequence[int]]],
        neuron_set: str | None | _ServerDefault = None,
    ) -> list[LoglikelihoodResult]:
        """lm_eval's ``loglikelihood`` via ``/v1/negablate/loglikelihood``: per
        ``(context ids, continuation ids)``, the continuation's summed log-probability
        given the context and whether it is the greedy one. The server computes the
        continuation's rows only (cheaper than :meth:`score` when contexts are long);
        ``neuron_set`` as in :meth:`score`. At most
        :data:`~server.schemas.MAX_ITEMS` items per call.
        """
        selector = _selector(neuron_set)
        model = self.model if selector is None else f"{self.model}@{selector}"
        body = LoglikelihoodRequest(model=model, items=[
            LoglikelihoodItem(context=[int(t) for t in c], continuation=[int(t) for t in x]) for c, x in items])
        data = self._request("POST", LOGLIKELIHOOD_PATH, json=body.model_dump(exclude_none=True))
        return LoglikelihoodResponse.model_validate(data).data

    def ab(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[str],
        set_a: str | None | _ServerDefault,
        set_b: str | None | _ServerDefault,
    ) -> ABResult:
        """Score the same prompts under two conditions (``None``: no ablation, always)."""
        return ABResult(a=self.score(prompts, set_a), b=self.score(prompts, set_b))
