"""The text discovery runs on: corpus files, their tokens, and the windows sent to the model.

Its own module so that everything that needs windows (the engine run in
:mod:`vllm_negablate.discovery.pipeline`, the perplexity-matched search, the CLI, the
benchmarks) cuts them one way without loading the engine or statistics code:

* WikiText-2 rows are joined the way the reference code does (rows joined with a space for
  the statistics, ``"\\n\\n"`` for perplexity; blank rows kept empty),
* windows of ``window_tokens`` tokens (:func:`corpus_windows`) each start with the model's
  start token (:mod:`vllm_negablate.start_token`: the embedded model's marker, else BOS,
  else EOS; the token evaluation uses too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_negablate.discovery.errors import DiscoveryError
from vllm_negablate.paths import wikitext
from vllm_negablate.start_token import StartTokenError
from vllm_negablate.start_token import start_token_id as rule_start_token_id

DEFAULT_CORPUS = wikitext("valid")
DEFAULT_EVAL_CORPUS = wikitext("test")

__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_EVAL_CORPUS",
    "read_corpus_text",
    "tokenize_corpus",
    "make_windows",
    "corpus_windows",
    "CorpusWindows",
]


def read_corpus_text(path: str | Path, joiner: str = " ") -> str:
    """A corpus file as one string.

    WikiText files are read with the hub's row rule (one row per line, newline kept,
    blank lines as empty strings) and joined with ``joiner``: the reference code uses
    ``" "`` for neuron statistics and ``"\\n\\n"`` for perplexity. ``joiner=None``-like
    behaviour (the file verbatim) is ``joiner=""``.
    """
    with open(path, encoding="utf-8") as f:
        rows = [line if line.strip() else "" for line in f]
    return joiner.join(rows)


def _start_token_of(model: str | Path | None, tokenizer: Any) -> int:
    try:
        return rule_start_token_id(model or None, fallback=lambda: tokenizer)
    except StartTokenError as exc:
        raise DiscoveryError(str(exc)) from None


def tokenize_corpus(tokenizer: Any, path: str | Path, joiner: str = " ") -> list[int]:
    """Token ids of the whole corpus, without special tokens."""
    text = read_corpus_text(path, joiner)
    try:  # no "sequence longer than the model" warning: windows are cut afterwards
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:
        enc = tokenizer(text, add_special_tokens=False)
    return list(enc["input_ids"])


def make_windows(
    token_ids: Sequence[int],
    window_tokens: int,
    start_id: int | None,
    *,
    max_tokens: int | None = None,
    stride: int | None = None,
    min_tokens: int = 2,
) -> list[list[int]]:
    """Cut ``token_ids`` into windows of ``window_tokens`` tokens, each ``[start_id] + text``.

    ``stride`` (text tokens between window starts) defaults to non-overlapping windows.
    ``max_tokens`` caps the total number of tokens *including* the start tokens (the last
    window is cut short); windows shorter than ``min_tokens`` are dropped.
    """
    body = window_tokens - (0 if start_id is None else 1)
    if body < 1:
        raise ValueError(f"window_tokens={window_tokens} leaves no room for text")
    stride = body if stride is None else int(stride)
    if stride < 1:
        raise ValueError("stride must be >= 1")
    windows: list[list[int]] = []
    total = 0
    for start in range(0, len(token_ids), stride):
        w = ([] if start_id is None else [int(start_id)]) + [
            int(t) for t in token_ids[start : start + body]
        ]
        if max_tokens is not None:
            w = w[: max(0, max_tokens - total)]
        if len(w) < min_tokens:
            break
        windows.append(w)
        total += len(w)
        if (max_tokens is not None and total >= max_tokens) or start + body >= len(token_ids):
            break
    return windows


@dataclass
class CorpusWindows:
    """Windows cut from a corpus, each starting with ``start_id``."""

    start_id: int
    windows: list[list[int]]


def corpus_windows(
    tokenizer: Any,
    model: str | Path | None,
    corpus_path: str | Path,
    window_tokens: int,
    *,
    joiner: str = " ",
    max_tokens: int | None = None,
    stride: int | None = None,
) -> CorpusWindows:
    """Tokenize ``corpus_path`` with ``tokenizer`` and cut windows led by ``model``'s start token.

    The start token comes from :func:`vllm_negablate.start_token.start_token_id` with the
    model directory (its marker first), not from the tokenizer object: discovery,
    perplexity matching and evaluation must feed the model the same first token.
    """
    start_id = _start_token_of(model, tokenizer)
    ids = tokenize_corpus(tokenizer, corpus_path, joiner)
    windows = make_windows(ids, window_tokens, start_id, max_tokens=max_tokens, stride=stride)
    return CorpusWindows(start_id=start_id, windows=windows)
