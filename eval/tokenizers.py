"""Tokenizers for the HTTP scorer (:class:`eval.scoring.CompletionsScorer`).

Prompts are sent as **token ids**, tokenized here, so the ids scored are exactly
the ids that were meant, with the start token in front, and the score cache can be
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

The server tokenizer raises the scorer's errors (:mod:`eval.errors`) and takes its
URLs through :func:`server.http.normalize_base_url`, like the scorer.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from eval.errors import ServerError
from server.http import RetryPolicy, RetryTransport, auth_headers, normalize_base_url
from vllm_negablate.start_token import (
    StartTokenError,
    read_special_tokens,
    resolve_start_token,
    token_content,
)

__all__ = [
    "LocalTokenizer",
    "ServerTokenizer",
    "TokenizerError",
    "TokenizerLike",
]


# --------------------------------------------------------------------------- errors


class TokenizerError(ValueError):
    """The tokenizer could not be loaded, or has no usable start token."""


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
