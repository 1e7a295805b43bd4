"""Score token sequences through any OpenAI-compatible ``/v1/completions`` endpoint.

The one primitive every evaluation here needs is *prompt log-probabilities*:
``log p(token_t | tokens_<t)`` for each position of a given token sequence. The
OpenAI completions API returns them when asked to echo the prompt::

    POST {base_url}/v1/completions
    {"model": "BASE@SET", "prompt": [[2, 464, 3797, ...], [2, 464, ...]],
     "echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0}

Each choice's ``logprobs.token_logprobs`` then holds one entry per prompt token,
the first ``null`` (nothing predicts the first token). Checked against vLLM 0.32:
``max_tokens: 0`` with ``echo: true`` returns exactly the prompt tokens (vLLM
generates one hidden token, so a prompt must be at most ``max_model_len - 1``
tokens). Servers that refuse ``max_tokens: 0`` (a 400 naming ``max_tokens``) are
retried with ``max_tokens: 1`` and the generated token is dropped; that is what
``lm_eval`` always sends.

Tokenization (the design choice)
--------------------------------
Prompts are sent as **token ids**, tokenized here, so the ids scored are exactly
the ids that were meant, with the start token in front, and the cache can be
keyed by exact ids. The start token follows the project's one rule
(:mod:`vllm_negablate.start_token`, also used by neuron discovery): an embedded
model's recorded token, else BOS, else EOS (as ``lm_eval`` does).
:class:`LocalTokenizer` reads the model directory's ``tokenizer.json`` with the
``tokenizers`` library (``transformers.AutoTokenizer`` is *not* used: importing
it imports torch, and this package must stay torch-free); special tokens come
from ``tokenizer_config.json`` / ``special_tokens_map.json`` the way
``transformers`` reads them, so for a plain model directory the start token is
the one ``lm_eval``'s ``tokenizer_backend=huggingface`` picks. Text is encoded with
``add_special_tokens=False``, which for ``tokenizer.json``-based tokenizers
gives the same ids as ``AutoTokenizer(text, add_special_tokens=False)``.
:class:`ServerTokenizer` instead asks the server's ``/tokenize`` endpoint (vLLM
has it), for when no local copy of the tokenizer exists; it needs the start
token id given explicitly unless the server exposes ``/tokenizer_info``.

Neuron sets
-----------
The set is chosen either in the model name, ``model="BASE@SET"`` (what
``negablate serve`` understands, and what ``lm_eval`` can send), or in the body,
``neuron_set="SET"`` / ``extra_body={"vllm_xargs": {"neuron_set": "SET"}}``
(sent as ``model=BASE``). Against plain vLLM use ``model=BASE`` and no set.

Cache
-----
Results go to an SQLite file (:class:`ScoreCache`), one row per sequence, keyed
by SHA-256 of ``(served model id BASE, neuron set, exact token ids)``: the
server URL is not part of the key, so the same model served elsewhere reuses the
rows. Each finished batch is committed at once, so an interrupted run, rerun,
resumes where it stopped, and a finished one is answered without any HTTP call.
Pass ``cache=False`` to switch it off, or ``cache_namespace=`` to keep results of
different weights served under the same name apart.

Example::

    from eval.scoring import CompletionsScorer
    with CompletionsScorer("http://127.0.0.1:8000", "pythia-160m@wd1",
                           tokenizer="/models/pythia-160m") as sc:
        ids = sc.encode("The cats sleep.")          # [start] + tokens
        [lps] = sc.score_ids([ids])                 # [None, lp_1, lp_2, ...]
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import httpx

from server.completions import CompletionsFormatError, parse_prompt_logprobs, prompt_logprob_body
from server.http import (
    AsyncRetryTransport,
    ModelListError,
    RetryEvent,
    RetryPolicy,
    RetryTransport,
    alist_models,
    auth_headers,
)
from vllm_negablate.neuron_set import NO_ABLATION, is_no_ablation
from vllm_negablate.settings import get_settings
from vllm_negablate.start_token import (
    StartTokenError,
    read_special_tokens,
    resolve_start_token,
    token_content,
)

logger = logging.getLogger("negablate.eval")

__all__ = [
    "CACHE_ENV",
    "CompletionsScorer",
    "LocalTokenizer",
    "ScoreCache",
    "ScoringError",
    "ServerError",
    "ServerTokenizer",
    "TokenizerError",
    "TokenizerLike",
    "default_cache_path",
    "normalize_base_url",
    "split_model",
]

CACHE_ENV = "NEGABLATE_EVAL_CACHE"
_CACHE_SCHEMA = 1

EchoMode = Literal["auto", "max_tokens_0", "max_tokens_1"]


# --------------------------------------------------------------------------- errors


class ScoringError(RuntimeError):
    """Scoring failed (bad response, server error after retries, ...)."""


class ServerError(ScoringError):
    """The server answered with an error; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, url: str) -> None:
        self.status = status
        self.message = message
        self.url = url
        super().__init__(f"{url} answered {status}: {message}")


class TokenizerError(ValueError):
    """The tokenizer could not be loaded, or has no usable start token."""


# --------------------------------------------------------------------------- helpers


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


def split_model(model: str) -> tuple[str, str | None]:
    """``"BASE@SET"`` -> ``("BASE", "SET")``; ``"BASE"`` -> ``("BASE", None)``.

    Split at the first ``@``, as the negablate server does."""
    base, sep, name = model.partition("@")
    if not sep:
        return model, None
    if not base or not name:
        raise ValueError(f"model {model!r}: expected BASE@SET with both parts non-empty")
    return base, name


def default_cache_path() -> Path:
    """``$NEGABLATE_EVAL_CACHE`` if set, else ``~/.cache/negablate/eval-scores.sqlite``."""
    configured = get_settings().eval_cache
    if configured is not None:
        return configured.expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base) / "negablate" / "eval-scores.sqlite"


# --------------------------------------------------------------------------- tokenizers


class TokenizerLike(Protocol):
    """What the scorer needs from a tokenizer."""

    start_token_id: int

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def describe(self) -> dict[str, Any]: ...


class LocalTokenizer:
    """A model directory's ``tokenizer.json``, read with the ``tokenizers`` library.

    ``start_token``: override the start token (an id, or a token string such as
    ``"<|endoftext|>"``); default :func:`vllm_negablate.start_token.resolve_start_token`
    on the tokenizer's directory: an embedded model's marker, else BOS, else EOS from
    the tokenizer's config (the rule of ``lm_eval``'s ``prefix_token_id``), so that
    scoring starts sequences with the token discovery used.
    """

    def __init__(self, path: str | os.PathLike[str], start_token: int | str | None = None) -> None:
        from tokenizers import Tokenizer  # light, no torch

        p = Path(path).expanduser()
        tj = p / "tokenizer.json" if p.is_dir() else p
        if not tj.is_file():
            raise TokenizerError(
                f"no tokenizer.json at {p}: give a model directory holding tokenizer.json "
                "(a fast tokenizer), or use --tokenizer server to tokenize on the server"
            )
        self.path = tj.parent
        raw = tj.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        try:
            special = read_special_tokens(self.path)
        except StartTokenError as e:
            raise TokenizerError(str(e)) from None
        self.bos_token, self.bos_token_id = special.bos_token, special.bos_token_id
        self.eos_token, self.eos_token_id = special.eos_token, special.eos_token_id
        if start_token is None:
            try:
                sid = resolve_start_token(self.path, special=special).id
            except StartTokenError:
                raise TokenizerError(
                    f"{self.path}: no embedded-model marker, and the tokenizer config names "
                    "neither a BOS nor an EOS token; give the start token explicitly (--start-token)"
                ) from None
        elif isinstance(start_token, int) or (isinstance(start_token, str) and start_token.isdigit()):
            sid = int(start_token)
            if not 0 <= sid < self._tok.get_vocab_size(with_added_tokens=True):
                raise TokenizerError(f"start token id {sid} is outside the vocabulary")
        else:
            sid = self._tok.token_to_id(start_token)
            if sid is None:
                raise TokenizerError(f"start token {start_token!r} is not in {tj}")
        self.start_token_id: int = int(sid)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [list(e.ids) for e in encs]

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "path": str(self.path),
            "tokenizer_json_sha256": self.sha256,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "start_token_id": self.start_token_id,
        }


class ServerTokenizer:
    """Tokenize with the server's ``POST /tokenize`` (vLLM), ``add_special_tokens: false``.

    The start token id is taken from ``start_token_id`` or, if that is None, from
    ``GET /tokenizer_info`` (vLLM serves it with ``--enable-tokenizer-info-endpoint``):
    its BOS, else EOS, token, looked up with ``/tokenize``. Requests go through the
    shared retrying transport (:mod:`server.http`; ``policy``, default its defaults).
    """

    def __init__(
        self, base_url: str, model: str, *, api_key: str | None = None,
        start_token_id: int | None = None, timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None, policy: RetryPolicy | None = None,
    ) -> None:
        self.base_url = normalize_base_url(base_url)
        self.model = model
        self._client = httpx.Client(base_url=self.base_url, headers=auth_headers(api_key), timeout=timeout,
                                    transport=RetryTransport(transport, policy))
        self._start = start_token_id

    @property
    def start_token_id(self) -> int:  # type: ignore[override]
        if self._start is None:
            r = self._client.get("/tokenizer_info")
            if r.status_code != 200:
                raise TokenizerError(
                    f"{self.base_url}/tokenizer_info answered {r.status_code}: the server does not "
                    "say its BOS/EOS token; give --start-token ID (or a local --tokenizer DIR)"
                )
            info = r.json()
            tok = token_content(info.get("bos_token")) or token_content(info.get("eos_token"))
            if tok is None:
                raise TokenizerError(f"{self.base_url}/tokenizer_info names no BOS/EOS token")
            ids = self._tokenize(tok)
            if len(ids) != 1:
                raise TokenizerError(f"start token {tok!r} tokenizes to {ids}, not one id")
            self._start = ids[0]
        return self._start

    def _tokenize(self, text: str) -> list[int]:
        r = self._client.post(
            "/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False}
        )
        if r.status_code != 200:
            raise ServerError(r.status_code, r.text[:500], f"{self.base_url}/tokenize")
        return [int(t) for t in r.json()["tokens"]]

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text) if text else []

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def describe(self) -> dict[str, Any]:
        return {"kind": "server", "url": f"{self.base_url}/tokenize",
                "start_token_id": self.start_token_id}

    def close(self) -> None:
        self._client.close()


# --------------------------------------------------------------------------- cache


def cache_key(model_id: str, neuron_set: str | None, ids: Sequence[int], namespace: str = "") -> str:
    """SHA-256 of the canonical JSON of (schema, namespace, model, set, ids)."""
    payload = json.dumps(
        [_CACHE_SCHEMA, namespace, model_id, neuron_set or "", [int(t) for t in ids]],
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ScoreCache:
    """Prompt log-probabilities in an SQLite file, one row per scored sequence.

    Table ``scores(key TEXT PRIMARY KEY, model TEXT, neuron_set TEXT, n_tokens INT,
    logprobs TEXT, created REAL)``; ``logprobs`` is the JSON list as returned
    (first entry ``null``). JSON keeps Python floats exactly. WAL mode, so a reader
    may look while a run writes; each :meth:`put_many` is one committed transaction.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60.0, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
            "neuron_set TEXT NOT NULL, n_tokens INTEGER NOT NULL, logprobs TEXT NOT NULL, "
            "created REAL NOT NULL)"
        )
        self._conn.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, list[float | None]]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, list[float | None]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            q = f"SELECT key, logprobs FROM scores WHERE key IN ({','.join('?' * len(chunk))})"
            for k, v in self._conn.execute(q, chunk):
                out[k] = json.loads(v)
        return out

    def put_many(self, rows: Iterable[tuple[str, str, str | None, list[float | None]]]) -> None:
        """``rows``: ``(key, model, neuron_set, logprobs)``."""
        now = time.time()
        self._conn.executemany(
            "INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?)",
            [(k, m, s or "", len(lp), json.dumps(lp), now) for k, m, s, lp in rows],
        )
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        self._conn.close()


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
        batch_size: int = 32,
        max_batch_tokens: int = 32768,
        concurrency: int = 4,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 600.0,
        echo_mode: EchoMode = "auto",
        progress: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if batch_size < 1 or concurrency < 1 or max_batch_tokens < 1:
            raise ValueError("batch_size, max_batch_tokens and concurrency must be >= 1")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if echo_mode not in ("auto", "max_tokens_0", "max_tokens_1"):
            raise ValueError(f"unknown echo_mode {echo_mode!r}")
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
        self._default_probed = self.neuron_set is not None
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
        self.progress = progress
        self.transport = transport
        self._echo_lock: asyncio.Lock | None = None
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
            "set_via": self.set_via,
            "server_default": self.server_default,
            "tokenizer": self.tokenizer.describe(),
            "echo_mode": self.echo_mode,
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

    def key(self, ids: Sequence[int]) -> str:
        return cache_key(self.base_model, self.condition, ids, self.cache_namespace)

    async def _probe_server_default(self) -> None:
        """Warn when a run naming no set would be scored under the server's default set.

        ``negablate serve`` lists it as ``negablate_default`` on the base model's card in
        /v1/models; other servers have no such field (no default). Asked once per scorer.
        """
        if self._default_probed:
            return
        self._default_probed = True
        try:
            cards = await alist_models(self.base_url, self.api_key, transport=self.transport,
                                       timeout=30.0, policy=self.retry_policy)
        except (ModelListError, ValueError):
            return  # no list, no known default: the completions requests will say what is wrong
        for card in cards:
            if isinstance(card, dict) and card.get("id") == self.base_model:
                default = card.get("negablate_default")
                if isinstance(default, str) and default:
                    self.server_default = default
                    logger.warning(
                        "%s names no neuron set, and the server's default set is %r: these scores "
                        "are under %r, not the unablated model (use %s@%s or --neuron-set %s for "
                        "no ablation)", self.model, default, default, self.base_model,
                        NO_ABLATION, NO_ABLATION)

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
        await self._probe_server_default()
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

                if self.echo_mode == "auto" and batches:
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

    def _body(self, prompts: list[list[int]], max_tokens: int) -> dict[str, Any]:
        return prompt_logprob_body(self.model, prompts, max_tokens, self.extra_body)

    async def _request(self, client: httpx.AsyncClient, prompts: list[list[int]]) -> list[list[float | None]]:
        """One batch; transient failures are retried by the client's transport, so what
        arrives here is final, except the echo-mode fallback (max_tokens 0 refused)."""
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
            return [p.logprobs for p in parse_prompt_logprobs(data, prompts, max_tokens)]
        except CompletionsFormatError as e:
            raise ScoringError(f"{self.base_url}/v1/completions: {e}") from e

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

