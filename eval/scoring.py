"""Score token sequences through any OpenAI-compatible ``/v1/completions`` endpoint.

The one primitive every evaluation here needs is *prompt log-probabilities*:
``log p(token_t | tokens_<t)`` for each position of a given token sequence. The
OpenAI completions API returns them when asked to echo the prompt::

    POST {base_url}/v1/completions
    {"model": "BASE@SET", "prompt": [[2, 464, 3797, ...], [2, 464, ...]],
     "echo": true, "logprobs": 0, "max_tokens": 0, "temperature": 0}

Each choice's ``logprobs.token_logprobs`` then holds one entry per prompt token,
the first ``null`` (nothing predicts the first token). Checked against vLLM 0.32:
``max_tokens: 0`` with ``echo: true`` returns exactly the prompt tokens (vLLM
generates one hidden token, so a prompt must be at most ``max_model_len - 1``
tokens). Servers that refuse ``max_tokens: 0`` (a 400 naming ``max_tokens``) are
retried with ``max_tokens: 1`` and the generated token is dropped; that is what
``lm_eval`` always sends. Likewise a server that refuses ``logprobs: 0`` (a 400
naming ``logprobs``) is asked again with ``logprobs: 1``.

Prompts are sent as **token ids**, tokenized by :mod:`eval.tokenizers` (a local
``tokenizer.json`` or the server's ``/tokenize``), with the start token in front;
results are kept in the SQLite cache of :mod:`eval.score_cache`, keyed by the exact
ids, so a rerun resumes where it stopped.

Neuron sets
-----------
The set is chosen either in the model name, ``model="BASE@SET"`` (what
``negablate serve`` understands, and what ``lm_eval`` can send), or in the body,
``neuron_set="SET"`` / ``extra_body={"vllm_xargs": {"neuron_set": "SET"}}``
(sent as ``model=BASE``). Against plain vLLM use ``model=BASE`` and no set.

Example::

    from eval.scoring import CompletionsScorer
    with CompletionsScorer("http://127.0.0.1:8000", "pythia-160m@wd1",
                           tokenizer="/models/pythia-160m") as sc:
        ids = sc.encode("The cats sleep.")          # [start] + tokens
        [lps] = sc.score_ids([ids])                 # [None, lp_1, lp_2, ...]
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import httpx

from eval.errors import ScoringError, ServerError
from eval.score_cache import ScoreCache, cache_key, default_cache_path
from eval.tokenizers import LocalTokenizer, ServerTokenizer, TokenizerError, TokenizerLike
from server.completions import CompletionsFormatError, parse_prompt_logprobs, prompt_logprob_body
from server.http import (
    AsyncRetryTransport,
    ModelListError,
    RetryEvent,
    RetryPolicy,
    alist_models,
    auth_headers,
    normalize_base_url,
)
from vllm_negablate import defaults
from vllm_negablate.neuron_set import NO_ABLATION, is_no_ablation
from vllm_negablate.precision import normalize_dtype

logger = logging.getLogger("negablate.eval")

__all__ = [
    "CompletionsScorer",
    "split_model",
]

EchoMode = Literal["auto", "max_tokens_0", "max_tokens_1"]


# --------------------------------------------------------------------------- helpers


def split_model(model: str) -> tuple[str, str | None]:
    """``"BASE@SET"`` -> ``("BASE", "SET")``; ``"BASE"`` -> ``("BASE", None)``.

    Split at the first ``@``, as the negablate server does."""
    base, sep, name = model.partition("@")
    if not sep:
        return model, None
    if not base or not name:
        raise ValueError(f"model {model!r}: expected BASE@SET with both parts non-empty")
    return base, name


# --------------------------------------------------------------------------- scorer


def _chunks(
    items: Sequence[tuple[str, list[int]]], batch_size: int, max_batch_tokens: int
) -> Iterator[list[tuple[str, list[int]]]]:
    cur: list[tuple[str, list[int]]] = []
    ntok = 0
    for it in items:
        n = len(it[1])
        if cur and (len(cur) >= batch_size or ntok + n > max_batch_tokens):
            yield cur
            cur, ntok = [], 0
        cur.append(it)
        ntok += n
    if cur:
        yield cur


class CompletionsScorer:
    """Prompt log-probabilities from an OpenAI-compatible completions endpoint.

    Parameters
    ----------
    base_url:
        Server root, e.g. ``http://127.0.0.1:8000`` (``/v1`` or
        ``/v1/completions`` at the end are accepted and stripped).
    model:
        Served model name, optionally ``BASE@SET`` to select a neuron set.
    api_key:
        Sent as ``Authorization: Bearer ...`` (default ``$OPENAI_API_KEY``, if set).
    tokenizer:
        A model directory (or its ``tokenizer.json``) read by :class:`LocalTokenizer`;
        ``"server"`` for :class:`ServerTokenizer`; any object with
        ``start_token_id`` and ``encode_batch``; or ``None`` to use ``model``'s base
        name as a directory when it is one (vLLM's default served name is the path).
    neuron_set / extra_body:
        Select the set in the body instead: sent as ``vllm_xargs.neuron_set``
        (``extra_body`` is merged into every request body).
    cache:
        ``None`` -> :func:`default_cache_path`; a path or :class:`ScoreCache`; ``False``: off.
    batch_size / max_batch_tokens / concurrency:
        Prompts per request, token budget per request, requests in flight.
    max_retries / backoff / max_backoff / timeout:
        The :class:`~server.http.RetryPolicy` of the shared retrying transport: retries
        on connection errors, timeouts, 408, 425, 429 and 5xx, with exponential backoff
        ``backoff * 2**attempt`` raised to ``Retry-After`` (capped, with jitter);
        ``timeout`` per request. ``n_retries`` counts the retried completions requests.
    echo_mode:
        ``"auto"`` (``max_tokens: 0``, falling back to 1 if refused), or force one.
    endpoint:
        ``"auto"``: ``negablate serve``'s ``/v1/negablate/loglikelihood`` when the server
        lists it on its base card (``negablate_loglikelihood``), where a sequence's rows
        shared with the sequence before it in a batch are copied instead of computed
        (:mod:`eval.continuations`: the second sentence of a minimal pair), else
        ``/v1/completions``; or force ``"completions"``.
    progress:
        Show a tqdm progress bar (sequences scored).
    transport:
        An ``httpx.AsyncBaseTransport`` (tests: ``httpx.MockTransport``/``ASGITransport``),
        wrapped in the retrying transport and never closed here.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        tokenizer: str | os.PathLike[str] | TokenizerLike | None = None,
        *,
        neuron_set: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        start_token: int | str | None = None,
        cache: str | os.PathLike[str] | ScoreCache | Literal[False] | None = None,
        cache_namespace: str = "",
        batch_size: int = defaults.SENTENCES_PER_REQUEST,
        max_batch_tokens: int = 32768,
        concurrency: int = 4,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 600.0,
        echo_mode: EchoMode = "auto",
        endpoint: Literal["auto", "completions"] = "auto",
        progress: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
        dtype: str | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size, max_batch_tokens and concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if echo_mode not in ("auto", "max_tokens_0", "max_tokens_1"):
            raise ValueError(f"unknown echo_mode {echo_mode!r}")
        if endpoint not in ("auto", "completions"):
            raise ValueError(f"unknown endpoint {endpoint!r}")
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self.base_model, model_set = split_model(model)
        self.extra_body: dict[str, Any] = json.loads(json.dumps(dict(extra_body or {})))
        xargs = self.extra_body.get("vllm_xargs") or {}
        if not isinstance(xargs, dict):
            raise ValueError("extra_body['vllm_xargs'] must be a mapping")
        body_set = xargs.get("neuron_set")
        if neuron_set is not None:
            if body_set is not None and body_set != neuron_set:
                raise ValueError(f"neuron_set {neuron_set!r} conflicts with extra_body {body_set!r}")
            body_set = neuron_set
            self.extra_body["vllm_xargs"] = {**xargs, "neuron_set": neuron_set}
        if model_set is not None and body_set is not None:
            raise ValueError(
                f"the neuron set is given twice: in the model name ({model!r}) and in the body "
                f"({body_set!r}); use one of model='BASE@SET' or neuron_set='SET'"
            )
        self.neuron_set: str | None = model_set if model_set is not None else body_set
        # For a run that names no set: the server's default set when it began
        # (read from /v1/models on first use; None when there is none or plain vLLM).
        self.server_default: str | None = None
        # What the server computes in (``negablate_dtype`` on its card; None: not said),
        # and what the caller expects (``dtype=``: a mismatch stops the run).
        self.server_dtype: str | None = None
        # The content hash of the set the run scores under (``negablate_content_hash`` on
        # the server's ``BASE@SET`` card; None: no set, or a server that does not say).
        # It joins the cache key and every request (``vllm_xargs.neuron_set_hash``), so a
        # set replaced under the same name never answers from the old content's rows, and
        # one replaced during the run is refused by the server instead of mixed in.
        self.set_hash: str | None = None
        self.expected_dtype = normalize_dtype(dtype) if dtype else None
        self._server_probed = False
        self.set_via: str | None = (
            "model" if model_set is not None else ("vllm_xargs" if body_set is not None else None)
        )
        self.api_key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or None)
        self._tokenizer_arg = tokenizer
        self._start_token = start_token
        self._tokenizer: TokenizerLike | None = None
        if cache is False:
            self.cache: ScoreCache | None = None
        elif isinstance(cache, ScoreCache):
            self.cache = cache
        else:
            self.cache = ScoreCache(default_cache_path() if cache is None else cache)
        self._owns_cache = not isinstance(cache, ScoreCache)
        self.cache_namespace = cache_namespace
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.echo_mode: EchoMode = echo_mode
        self.endpoint = endpoint
        # the continuation route's path when the server lists it (and the body needs
        # nothing the route does not take); None: /v1/completions
        self.loglikelihood_path: str | None = None
        self.progress = progress
        self.transport = transport
        self._echo_lock: asyncio.Lock | None = None
        # ``logprobs`` of each request: 0 (only the prompt tokens' own), 1 if refused
        self.top_logprobs = 0
        # counters (cumulative over calls)
        self.n_requests = 0
        self.n_retries = 0
        self.n_scored = 0
        self.n_cache_hits = 0

    # ------------------------------------------------------------------ identity
    @property
    def tokenizer(self) -> TokenizerLike:
        """The tokenizer, loaded on first use."""
        if self._tokenizer is None:
            t = self._tokenizer_arg
            if t is None:
                if Path(self.base_model).expanduser().is_dir():
                    t = self.base_model
                else:
                    raise TokenizerError(
                        f"no tokenizer given and the model name {self.base_model!r} is not a "
                        "local directory: pass tokenizer=DIR (--tokenizer DIR) or 'server'"
                    )
            if isinstance(t, (str, os.PathLike)) and str(t) == "server":
                sid = None
                if self._start_token is not None:
                    if not str(self._start_token).isdigit():
                        raise TokenizerError("with the server tokenizer, give the start token as an id")
                    sid = int(self._start_token)
                self._tokenizer = ServerTokenizer(
                    self.base_url, self.base_model, api_key=self.api_key, start_token_id=sid,
                    policy=self.retry_policy,
                )
            elif isinstance(t, (str, os.PathLike)):
                self._tokenizer = LocalTokenizer(t, start_token=self._start_token)
            else:
                self._tokenizer = t
        return self._tokenizer

    @property
    def retry_policy(self) -> RetryPolicy:
        """The retry policy of every request this scorer makes (from its current settings)."""
        return RetryPolicy(max_retries=self.max_retries, backoff=self.backoff, max_backoff=self.max_backoff)

    def describe(self) -> dict[str, Any]:
        """What a run summary records about the scoring setup."""
        return {
            "server": self.base_url,
            "model": self.model,
            "base_model": self.base_model,
            "neuron_set": self.neuron_set,
            "neuron_set_hash": self.set_hash,
            "set_via": self.set_via,
            "server_default": self.server_default,
            "tokenizer": self.tokenizer.describe(),
            "echo_mode": self.echo_mode,
            "endpoint": self.loglikelihood_path or "/v1/completions",
            "dtype": self.dtype,
            "cache": str(self.cache.path) if self.cache else None,
            "cache_namespace": self.cache_namespace,
        }

    def stats(self) -> dict[str, int]:
        return {"requests": self.n_requests, "retries": self.n_retries,
                "sequences_scored": self.n_scored, "cache_hits": self.n_cache_hits}

    # ------------------------------------------------------------------ tokenizing
    def encode(self, text: str) -> list[int]:
        """``[start token] + tokens(text)``: the sequence whose every token is scored."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        tok = self.tokenizer
        sid = tok.start_token_id
        return [[sid, *ids] for ids in tok.encode_batch(list(texts))]

    # ------------------------------------------------------------------ scoring
    @property
    def condition(self) -> str | None:
        """The set the scores are computed under: the named set, else the server's
        default at the start of the run; ``None`` for no ablation (``none`` included)."""
        name = self.neuron_set if self.neuron_set is not None else self.server_default
        return None if is_no_ablation(name) else name

    @property
    def dtype(self) -> str | None:
        """The dtype the scores are computed in: the server's word, else the caller's."""
        return self.server_dtype or self.expected_dtype

    def key(self, ids: Sequence[int]) -> str:
        return cache_key(self.base_model, self.condition, ids, self.cache_namespace, self.dtype,
                         self.set_hash)

    async def _probe_server(self) -> None:
        """Read the base model's card in /v1/models once: its dtype and default set.

        ``negablate serve`` lists ``negablate_dtype`` (what the engine computes in) and
        ``negablate_default`` (the set a request naming none gets) there, and each
        ``BASE@SET`` card's ``negablate_content_hash``; other servers have none of them
        (dtype unknown, no default, no hash). The dtype and the set's hash join the cache
        key, and a caller's ``dtype=`` that differs stops the run before anything is
        scored. A run naming no set is warned that it gets the default, and is then
        pinned to it: a default changed during the run does not reach it.
        """
        if self._server_probed:
            return
        self._server_probed = True
        try:
            cards = await alist_models(self.base_url, self.api_key, transport=self.transport,
                                       timeout=30.0, policy=self.retry_policy)
        except (ModelListError, ValueError):
            cards = []  # no list: the completions requests will say what is wrong
        for card in cards:
            if isinstance(card, dict) and card.get("id") == self.base_model:
                dtype = card.get("negablate_dtype")
                if isinstance(dtype, str) and dtype:
                    self.server_dtype = normalize_dtype(dtype)
                route = card.get("negablate_loglikelihood")
                if (self.endpoint == "auto" and isinstance(route, str) and route.startswith("/")
                        and set(self.extra_body) <= {"vllm_xargs"}):
                    self.loglikelihood_path = route
                default = card.get("negablate_default")
                if self.neuron_set is None and isinstance(default, str) and default:
                    self.server_default = default
                    logger.warning(
                        "%s names no neuron set, and the server's default set is %r: these scores "
                        "are under %r, not the unablated model (use %s@%s or --neuron-set %s for "
                        "no ablation)", self.model, default, default, self.base_model,
                        NO_ABLATION, NO_ABLATION)
        name = self.condition
        if name is not None:
            for card in cards:
                if isinstance(card, dict) and card.get("id") == f"{self.base_model}@{name}":
                    content_hash = card.get("negablate_content_hash")
                    if isinstance(content_hash, str) and content_hash:
                        self.set_hash = content_hash

    def score_ids(self, seqs: Sequence[Sequence[int]], desc: str | None = None) -> list[list[float | None]]:
        """Synchronous :meth:`ascore_ids` (not from inside a running event loop)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.ascore_ids(seqs, desc=desc))
        raise RuntimeError("score_ids() called inside an event loop; await ascore_ids() instead")

    def score_texts(self, texts: Sequence[str], desc: str | None = None) -> list[list[float | None]]:
        """Score ``[start] + tokens(text)`` for each text."""
        return self.score_ids(self.encode_batch(texts), desc=desc)

    async def ascore_ids(
        self, seqs: Sequence[Sequence[int]], desc: str | None = None
    ) -> list[list[float | None]]:
        """Prompt log-probabilities of each sequence: a list as long as the sequence,
        first entry ``None``. Cached sequences are not sent; duplicates are sent once.
        Sequences of length < 2 are answered locally (nothing to score)."""
        seqs = [[int(t) for t in s] for s in seqs]
        await self._probe_server()
        if self.expected_dtype and self.server_dtype and self.server_dtype != self.expected_dtype:
            raise ScoringError(
                f"{self.base_url}: {self.base_model} is served in {self.server_dtype}, not "
                f"{self.expected_dtype} (--dtype); restart the server with --dtype "
                f"{self.expected_dtype} or drop --dtype to score in {self.server_dtype}")
        keys = [self.key(s) for s in seqs]
        found: dict[str, list[float | None]] = {}
        todo: dict[str, list[int]] = {}
        for k, s in zip(keys, seqs, strict=True):
            if len(s) < 2:
                found[k] = [None] * len(s)
        if self.cache is not None:
            hits = self.cache.get_many(k for k in keys if k not in found)
            found.update(hits)
        for k, s in zip(keys, seqs, strict=True):
            if k not in found and k not in todo:
                todo[k] = s
        self.n_cache_hits += sum(1 for k in keys if k in found)
        if todo:
            await self._fetch(list(todo.items()), found, desc)
        return [list(found[k]) for k in keys]

    async def _fetch(
        self, items: list[tuple[str, list[int]]], found: dict[str, list[float | None]],
        desc: str | None,
    ) -> None:
        from tqdm.auto import tqdm

        self._echo_lock = asyncio.Lock()
        batches = list(_chunks(items, self.batch_size, self.max_batch_tokens))
        limits = httpx.Limits(max_connections=self.concurrency,
                              max_keepalive_connections=self.concurrency)
        # a caller's transport is kept open for the next call; ours lives for this one
        inner = self.transport if self.transport is not None else httpx.AsyncHTTPTransport(limits=limits)
        transport = AsyncRetryTransport(inner, self.retry_policy, on_retry=self._count_retry,
                                        close_inner=self.transport is None)
        sem = asyncio.Semaphore(self.concurrency)
        bar = tqdm(total=len(items), desc=desc or "scoring", unit="seq",
                   disable=not self.progress, leave=False)
        try:
            async with httpx.AsyncClient(
                base_url=self.base_url, headers=auth_headers(self.api_key), timeout=self.timeout,
                transport=transport,
            ) as client:

                async def run(batch: list[tuple[str, list[int]]]) -> None:
                    async with sem:
                        lps = await self._request(client, [s for _, s in batch])
                    if self.cache is not None:
                        self.cache.put_many(
                            (k, self.base_model, self.condition, lp)
                            for (k, _), lp in zip(batch, lps, strict=True)
                        )
                    for (k, _), lp in zip(batch, lps, strict=True):
                        found[k] = lp
                    self.n_scored += len(batch)
                    bar.update(len(batch))

                if self.echo_mode == "auto" and self.loglikelihood_path is None and batches:
                    # settle max_tokens 0 vs 1 on the first batch, then go concurrent
                    await run(batches[0])
                    batches = batches[1:]
                tasks = [asyncio.ensure_future(run(b)) for b in batches]
                try:
                    await asyncio.gather(*tasks)
                except BaseException:
                    # first failure: stop the rest (finished batches are already cached)
                    for t in tasks:
                        t.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                    raise
        finally:
            bar.close()

    def _count_retry(self, event: RetryEvent) -> None:
        """``on_retry`` hook of the transport: each retry is one more request sent."""
        self.n_retries += 1
        self.n_requests += 1

    def _xargs(self) -> dict[str, Any]:
        """The ``vllm_xargs`` of every request."""
        xargs = dict(self.extra_body.get("vllm_xargs") or {})
        if self.set_hash is not None:
            # name the set and the content the run began with: the server refuses the
            # request (409) if the name now holds other neurons, and the default set
            # changed mid-run cannot reach a run that began under another
            xargs.update(neuron_set=self.condition, neuron_set_hash=self.set_hash)
        return xargs

    def _body(self, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        xargs = self._xargs()
        extra = {**self.extra_body, "vllm_xargs": xargs} if xargs else self.extra_body
        return prompt_logprob_body(self.model, prompts, max_tokens, extra, self.top_logprobs)

    async def _request_continuations(self, client: httpx.AsyncClient,
                                     prompts: list[list[int]]) -> list[list[float | None]]:
        """One batch through the continuation route: each prompt's rows shared with the
        prompt before it are copied (:mod:`eval.continuations`), the rest computed."""
        from eval.continuations import assemble, plan
        from server.schemas import LoglikelihoodResponse

        url = self.loglikelihood_path
        starts = plan(prompts)
        items = [{"context": p[:st], "continuation": p[st:]} for p, st in zip(prompts, starts, strict=True)
                 if st is not None]
        body: dict[str, Any] = {"model": self.model, "items": items}
        xargs = self._xargs()
        if xargs:
            body["vllm_xargs"] = xargs
        try:
            self.n_requests += 1
            resp = await client.post(url, json=body)
        except (httpx.TimeoutException, httpx.TransportError) as e:
            raise ScoringError(f"{self.base_url}{url}: {type(e).__name__}: {e} (gave up after "
                               f"{self.max_retries + 1} attempts)") from e
        if resp.status_code != 200:
            msg = _error_message(resp)
            hint = (" (a prompt is too long for the server's max_model_len; use shorter windows)"
                    if resp.status_code == 400 and "max_model_len" in msg else "")
            raise ServerError(resp.status_code, msg + hint, f"{self.base_url}{url}")
        try:
            answer = LoglikelihoodResponse.model_validate_json(resp.content)
            results = sorted(answer.data, key=lambda r: r.index)
            if [r.index for r in results] != list(range(len(items))):
                raise ValueError(f"{len(results)} results for {len(items)} items")
            out = assemble(prompts, starts, [r.token_logprobs for r in results])
        except ValueError as e:  # pydantic's ValidationError included
            raise ScoringError(f"{self.base_url}{url}: unexpected answer: {e}") from e
        return self._refuse_nan(out, url)

    async def _request(self, client: httpx.AsyncClient, prompts: list[list[int]]) -> list[list[float | None]]:
        """One batch; transient failures are retried by the client's transport, so what
        arrives here is final, except the echo-mode fallback (max_tokens 0 refused)."""
        if self.loglikelihood_path is not None:
            return await self._request_continuations(client, prompts)
        url = "/v1/completions"
        while True:
            mode = self.echo_mode
            max_tokens = 1 if mode == "max_tokens_1" else 0
            try:
                self.n_requests += 1
                resp = await client.post(url, json=self._body(prompts, max_tokens))
            except (httpx.TimeoutException, httpx.TransportError) as e:
                # every transport error is retried until the policy gives up
                raise ScoringError(
                    f"{self.base_url}{url}: {type(e).__name__}: {e} (gave up after "
                    f"{self.max_retries + 1} attempts)"
                ) from e
            if resp.status_code == 200:
                try:
                    data = resp.json()
                except ValueError as e:
                    raise ScoringError(f"{self.base_url}{url}: response is not JSON: {resp.text[:200]!r}") from e
                out = self._parse(data, prompts, max_tokens)
                if mode == "auto":
                    self.echo_mode = "max_tokens_0"
                return out
            msg = _error_message(resp)
            if (resp.status_code in (400, 422) and mode == "auto" and max_tokens == 0
                    and "max_tokens" in msg):
                self.echo_mode = "max_tokens_1"
                continue
            if resp.status_code in (400, 422) and self.top_logprobs == 0 and "logprobs" in msg:
                self.top_logprobs = 1  # a server that wants at least one top log-prob
                continue
            hint = ""
            if resp.status_code == 404 and self.neuron_set is not None:
                hint = (" (is the neuron set loaded on the server? plain vLLM knows no "
                        "BASE@SET names: use the base model name without a set)")
            elif resp.status_code == 400 and "maximum" in msg and "length" in msg:
                hint = " (a prompt is too long for the server's max_model_len; use shorter windows)"
            raise ServerError(resp.status_code, msg + hint, f"{self.base_url}{url}")

    def _parse(self, data: Any, prompts: list[list[int]], max_tokens: int) -> list[list[float | None]]:
        """The shared parser (:func:`server.completions.parse_prompt_logprobs`), its
        errors as :class:`ScoringError` naming the endpoint."""
        try:
            out = [p.logprobs for p in parse_prompt_logprobs(data, prompts, max_tokens)]
        except CompletionsFormatError as e:
            raise ScoringError(f"{self.base_url}/v1/completions: {e}") from e
        return self._refuse_nan(out, "/v1/completions")

    def _refuse_nan(self, out: list[list[float | None]], url: str) -> list[list[float | None]]:
        """``out``, unless a row is NaN: what the engine computes when a request's set
        vanished between the server's check and the engine (see
        vllm_negablate.vllm_adapter.patch_engine_core): never a score, never cached."""
        if any(lp is not None and math.isnan(lp) for lps in out for lp in lps):
            raise ScoringError(
                f"{self.base_url}{url}: the server answered NaN log-probabilities "
                f"(was the neuron set {self.condition!r} replaced or deleted during the run?)")
        return out

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        if self.cache is not None and self._owns_cache:
            self.cache.close()
        if isinstance(self._tokenizer, ServerTokenizer):
            self._tokenizer.close()

    def __enter__(self) -> CompletionsScorer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:500] or resp.reason_phrase
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "detail" in data:
            return str(data["detail"])
    return json.dumps(data)[:500]

