"""The token every scored or observed sequence starts with: one rule for the whole project.

Discovery windows, perplexity matching, evaluation and every analysis put one token in
front of the text. If they disagreed (say SmolLM2: its tokenizer's BOS is the chat
marker ``<|im_start|>``, while the embedded model records ``<|endoftext|>``), neuron
statistics would describe one input distribution and the evaluation another. So they
all ask :func:`start_token_id` with the model directory, whose rule is:

1. the embedded model's marker (``negablate_model.json``, field ``start_token_id``),
   which records a deliberate choice for that model;
2. else the tokenizer's BOS, else its EOS (the rule of ``lm_eval``'s ``prefix_token_id``),
   read from ``tokenizer_config.json`` / ``special_tokens_map.json`` (a token saved as
   a string or an AddedToken dict) and looked up in the directory's vocabulary;
3. else, only where the directory's files name neither (a hub id, a directory without
   tokenizer files), a tokenizer object supplied by the caller (``fallback``);
4. else :class:`StartTokenError`.

Only ``json`` is used: this module must be importable without torch, transformers or
vLLM, because the evaluation package is torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MARKER_FILE = "negablate_model.json"

StartTokenSource = Literal["marker", "bos", "eos"]
PathLike = str | os.PathLike[str]

__all__ = [
    "MARKER_FILE",
    "SpecialTokens",
    "StartToken",
    "StartTokenError",
    "read_special_tokens",
    "recorded_start_token",
    "resolve_start_token",
    "start_token_id",
    "token_content",
]


class StartTokenError(ValueError):
    """No start token can be decided (or a tokenizer file is unreadable)."""


@dataclass(frozen=True)
class SpecialTokens:
    """BOS and EOS as the tokenizer files name them (content) and their ids (None: absent)."""

    bos_token: str | None = None
    bos_token_id: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None


@dataclass(frozen=True)
class StartToken:
    """The decided start token and which step of the rule decided it."""

    id: int
    source: StartTokenSource


def token_content(value: Any) -> str | None:
    """A special-token entry as transformers saves it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when the file does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StartTokenError(f"{path}: invalid JSON: {e}") from None


def _read_dict(path: Path) -> dict[str, Any]:
    obj = _read_json(path)
    return obj if isinstance(obj, dict) else {}


def _dir_of(path: PathLike | None) -> Path | None:
    """The local directory a model/tokenizer argument names (a ``tokenizer.json`` path
    counts as its directory); None for a hub id or anything else that is not local."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if p.is_file() and p.name == "tokenizer.json":
        return p.parent
    return p if p.is_dir() else None


def recorded_start_token(model_dir: PathLike | None) -> int | None:
    """The start token id an embedded model's marker records; None without a marker
    (or with an unreadable one, or one that records no id)."""
    d = _dir_of(model_dir)
    if d is None:
        return None
    try:
        marker = json.loads((d / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    sid = marker.get("start_token_id")
    return sid if isinstance(sid, int) and not isinstance(sid, bool) else None


def _vocab_lookup(directory: Path) -> Callable[[str], int | None]:
    """token -> id the way the ``tokenizers`` library answers ``token_to_id``: added tokens
    first, then the model's vocabulary. ``tokenizer_config.json``'s ``added_tokens_decoder``
    (small) is tried before parsing ``tokenizer.json`` (megabytes for large vocabularies)."""
    cache: dict[str, dict[str, int]] = {}

    def added_from_config() -> dict[str, int]:
        dec = _read_dict(directory / "tokenizer_config.json").get("added_tokens_decoder")
        out: dict[str, int] = {}
        if isinstance(dec, Mapping):
            for k, v in dec.items():
                content = token_content(v)
                if content is not None and str(k).isdigit():
                    out.setdefault(content, int(k))
        return out

    def from_tokenizer_json() -> dict[str, int]:
        tj = _read_json(directory / "tokenizer.json")
        out: dict[str, int] = {}
        if not isinstance(tj, dict):
            return out
        for entry in tj.get("added_tokens") or ():
            if isinstance(entry, Mapping) and isinstance(entry.get("id"), int):
                content = token_content(entry)
                if content is not None:
                    out.setdefault(content, int(entry["id"]))
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, Mapping):  # BPE, WordPiece, WordLevel
            for tok, tid in vocab.items():
                if isinstance(tid, int):
                    out.setdefault(str(tok), tid)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = index
            for tid, item in enumerate(vocab):
                if isinstance(item, (list, tuple)) and item and isinstance(item[0], str):
                    out.setdefault(item[0], tid)
        return out

    def lookup(token: str) -> int | None:
        for name, load in (("config", added_from_config), ("tokenizer", from_tokenizer_json)):
            if name not in cache:
                cache[name] = load()
            if token in cache[name]:
                return cache[name][token]
        return None

    return lookup


def read_special_tokens(tokenizer_dir: PathLike) -> SpecialTokens:
    """BOS/EOS of a tokenizer directory from its JSON files (``tokenizer_config.json``
    first, then ``special_tokens_map.json``), with ids from its vocabulary. A token the
    files name but the vocabulary lacks has id None."""
    d = _dir_of(tokenizer_dir)
    if d is None:
        return SpecialTokens()
    cfg = _read_dict(d / "tokenizer_config.json")
    stm = _read_dict(d / "special_tokens_map.json")
    lookup = _vocab_lookup(d)

    def special(name: str) -> tuple[str | None, int | None]:
        content = token_content(cfg.get(name)) or token_content(stm.get(name))
        return (content, None) if content is None else (content, lookup(content))

    bos, bos_id = special("bos_token")
    eos, eos_id = special("eos_token")
    return SpecialTokens(bos, bos_id, eos, eos_id)


def _from_tokenizer_object(tokenizer: Any) -> StartToken | None:
    for attr, source in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        tid = getattr(tokenizer, attr, None)
        if tid is not None:
            return StartToken(int(tid), source)  # type: ignore[arg-type]
    return None


def resolve_start_token(
    model_dir: PathLike | None,
    *,
    fallback: Callable[[], Any] | None = None,
    special: SpecialTokens | None = None,
) -> StartToken:
    """The start token of ``model_dir`` and the rule step that chose it (module docstring).

    ``fallback`` returns a tokenizer object (``bos_token_id`` / ``eos_token_id``); it is
    called only when ``model_dir`` is not a local directory or its files name neither a
    BOS nor an EOS with an id, so for a local model every caller gets the same answer
    from the same files whatever tokenizer object it holds. ``special``: what
    :func:`read_special_tokens` already returned for ``model_dir`` (saves reading a large
    ``tokenizer.json`` twice).
    """
    recorded = recorded_start_token(model_dir)
    if recorded is not None:
        return StartToken(recorded, "marker")
    if special is None:
        special = read_special_tokens(model_dir) if model_dir is not None else SpecialTokens()
    if special.bos_token_id is not None:
        return StartToken(special.bos_token_id, "bos")
    if special.eos_token_id is not None:
        return StartToken(special.eos_token_id, "eos")
    if fallback is not None:
        found = _from_tokenizer_object(fallback())
        if found is not None:
            return found
    raise StartTokenError(
        f"{model_dir}: no start token: no embedded-model marker, and the tokenizer names "
        "neither a BOS nor an EOS token that is in its vocabulary; give the start token explicitly"
    )


def start_token_id(model_dir: PathLike | None, *, fallback: Callable[[], Any] | None = None) -> int:
    """Token id sentences and windows start with: marker, else BOS, else EOS (see
    :func:`resolve_start_token`)."""
    return resolve_start_token(model_dir, fallback=fallback).id
