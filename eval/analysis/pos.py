"""Per-token surprisal change under ablation, grouped by Universal POS tag.

The question (``docs/science.md``, "POS analysis"): when a neuron set is ablated, *which
words* become harder to predict? The paper's finding is that ablating the
Wasserstein neurons' negative pre-activations raises surprisal mostly on function
words (DET, ADP, AUX, PRON, CCONJ, PART), i.e. on syntax.

Pipeline (all over HTTP; no torch, no vLLM here):

1. **Text.** Held-out text, by default WikiText-2 *test* (raw) from the shared data.
   WikiText is tokenized text (``actor .``, ``Teddy 's``, ``1 @,@ 000``); it is
   detokenized into normal English with every word's character span kept
   (:func:`eval.analysis.tagging.prepare_wikitext`), headings dropped, and cut into
   sentences. ``--words`` caps the amount (whole sentences, from the start of the
   split, after ``--skip-words``).
2. **Chunks.** Whole sentences of one paragraph are packed greedily into chunks of
   at most ``--chunk-tokens`` model tokens (also kept below the server's
   ``max_model_len``); a longer sentence is split between words. Each chunk is
   scored from the model's start token (recorded, else BOS, else EOS), so every text token gets a
   surprisal; context never crosses chunk boundaries.
3. **Tags.** spaCy ``en_core_web_sm`` if importable, else NLTK's tagger from the
   shared data mapped to UPOS (see :mod:`eval.analysis.tagging`); the tagger used
   is recorded in ``pos.json``.
4. **Alignment** (:func:`align_tokens`, the rule in :data:`ALIGNMENT_RULE`): model
   tokens carry character offsets (the ``tokenizers`` library's, on the same
   ``tokenizer.json`` the scorer uses, ids checked equal). A token belongs to the
   word it overlaps most (ties: the earlier word), so ``" the"`` (leading space)
   belongs to *the* and the pieces of a multi-token word all belong to it; a token
   that overlaps no word (whitespace only, e.g. ``" "`` or ``"\\n"``) belongs to the
   *following* word (the last word if none follows).
5. **Scoring.** :class:`eval.scoring.CompletionsScorer` (echo + logprobs, SQLite
   cache, so a rerun costs no model calls): the base model and ``BASE@SET`` per
   condition. Surprisal = ``-log p(token | prefix)`` in **nats** (``*_bits`` columns
   divide by ln 2). Excess = ablated - baseline, per token.
6. **Aggregation** per UPOS tag, plus the classes FUNCTION (DET ADP AUX PRON CCONJ
   PART), CONTENT (NOUN PROPN VERB ADJ ADV) and ALL: mean excess per token with a
   bootstrap CI over tokens, mean excess per word (sum over the word's tokens) with a
   bootstrap CI over words, counts, the tag's share of tokens and of total excess, and
   its mean relative to ALL (``ratio_to_all`` > 1: the tag is hit harder than an
   average token).

Outputs in ``--out``: ``pos.json``, ``pos.csv``, ``pos_tokens.jsonl`` (one row per
token per condition), ``pos_chunks.jsonl`` (the scored texts) and ``pos_excess.png``.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import hashlib
import json
import math
import os
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from pydantic import BaseModel, ConfigDict, Field

from eval.analysis.tagging import (
    CONTENT_TAGS,
    FUNCTION_TAGS,
    UPOS_TAGS,
    Paragraph,
    Sentence,
    TaggedWord,
    Tagger,
    TaggerUnavailableError,
    TextFormat,
    load_tagger,
    prepare_text,
)
from eval.stats import bootstrap_mean_ci
from vllm_negablate.neuron_set import NO_ABLATION

__all__ = [
    "ALIGNMENT_RULE",
    "Chunk",
    "GroupStats",
    "PosConfig",
    "PosReport",
    "aggregate",
    "align_tokens",
    "build_chunks",
    "register",
    "run_pos_analysis",
]

LN2 = math.log(2.0)
NO_WORD_TAG = "NONE"  # a token in a chunk without words (cannot happen with real text)

ALIGNMENT_RULE = (
    "Token/word alignment by character offsets in the chunk text: a model token belongs "
    "to the word it overlaps most (ties: the earlier word); a token overlapping no word "
    "(whitespace-only, zero-width) belongs to the following word, or to the last word "
    "if none follows. A word's excess is the sum over its tokens."
)


# --------------------------------------------------------------------------- alignment


def align_tokens(offsets: Sequence[tuple[int, int]], words: Sequence[tuple[int, int]]) -> list[int]:
    """Index into ``words`` for each token (``-1`` only when there are no words).

    ``offsets`` and ``words`` are ``(start, end)`` character spans (end exclusive)
    in the same text; ``words`` must be sorted and non-overlapping. See
    :data:`ALIGNMENT_RULE`.
    """
    if not words:
        return [-1] * len(offsets)
    starts = [w[0] for w in words]
    ends = [w[1] for w in words]
    out: list[int] = []
    for s, e in offsets:
        best, best_ov = -1, 0
        j = bisect.bisect_right(ends, s)  # first word ending after s
        while j < len(words) and starts[j] < e:
            ov = min(e, ends[j]) - max(s, starts[j])
            if ov > best_ov:
                best, best_ov = j, ov
            j += 1
        if best < 0:  # no overlap: the following word, else the last one
            k = bisect.bisect_left(starts, s)
            best = k if k < len(words) else len(words) - 1
        out.append(best)
    return out


# --------------------------------------------------------------------------- chunks

Encoder = Callable[[str], tuple[list[int], list[tuple[int, int]]]]


@dataclass
class Chunk:
    """One scored text: whole sentences of one paragraph (or a piece of a long one)."""

    index: int
    line: int
    text: str
    sentences: list[tuple[int, Sentence]]  # (offset of the sentence in text, sentence)
    token_ids: list[int]
    offsets: list[tuple[int, int]]
    words: list[TaggedWord] = field(default_factory=list)
    token_word: list[int] = field(default_factory=list)


def _join(sentences: Sequence[Sentence]) -> tuple[str, list[tuple[int, Sentence]]]:
    parts: list[tuple[int, Sentence]] = []
    off = 0
    for s in sentences:
        parts.append((off, s))
        off += len(s.text) + 1
    return " ".join(s.text for s in sentences), parts


def _sub_sentence(sent: Sentence, a: int, b: int) -> Sentence:
    """Words ``a:b`` of ``sent`` as a sentence of their own."""
    base = sent.words[a][0]
    end = sent.words[b - 1][1]
    return Sentence(text=sent.text[base:end], words=[(s - base, e - base) for s, e in sent.words[a:b]],
                    ptb_forms=list(sent.ptb_forms[a:b]))


def _split_long(sent: Sentence, encode: Encoder, budget: int) -> list[Sentence]:
    """Cut a sentence whose tokens exceed ``budget`` between words, greedily (each piece
    as many words as fit; a single word longer than the budget is an error)."""
    pieces: list[Sentence] = []
    a = 0
    n = len(sent.words)
    while a < n:
        lo, hi = a + 1, n  # largest b with tokens(words a:b) <= budget
        if len(encode(_sub_sentence(sent, a, lo).text)[0]) > budget:
            raise ValueError(f"the word {sent.word_texts()[a]!r} alone is longer than {budget} tokens")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(encode(_sub_sentence(sent, a, mid).text)[0]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        pieces.append(_sub_sentence(sent, a, lo))
        a = lo
    return pieces


def build_chunks(paragraphs: Sequence[Paragraph], encode: Encoder, budget: int) -> list[Chunk]:
    """Pack each paragraph's sentences into chunks of at most ``budget`` tokens
    (``encode(text) -> (ids, offsets)``, no special tokens)."""
    if budget < 1:
        raise ValueError(f"chunk budget must be >= 1 token, got {budget}")
    chunks: list[Chunk] = []

    def emit(line: int, sents: list[Sentence]) -> None:
        text, parts = _join(sents)
        ids, offs = encode(text)
        chunks.append(Chunk(index=len(chunks), line=line, text=text, sentences=parts,
                            token_ids=ids, offsets=offs))

    for para in paragraphs:
        cur: list[Sentence] = []
        for sent in para.sentences:
            pieces = [sent]
            if len(encode(sent.text)[0]) > budget:
                pieces = _split_long(sent, encode, budget)
            for piece in pieces:
                if cur and len(encode(_join([*cur, piece])[0])[0]) > budget:
                    emit(para.line, cur)
                    cur = []
                cur.append(piece)
        if cur:
            emit(para.line, cur)
    return chunks


def tag_and_align(chunks: Sequence[Chunk], tagger: Tagger) -> None:
    """Tag every chunk (in place) and map its tokens to words."""
    tagged = tagger.tag_chunks([(c.text, c.sentences) for c in chunks])
    for c, words in zip(chunks, tagged, strict=True):
        words = sorted(words, key=lambda w: (w.start, w.end))
        c.words = words
        c.token_word = align_tokens(c.offsets, [(w.start, w.end) for w in words])


# --------------------------------------------------------------------------- statistics


class GroupStats(BaseModel):
    """Excess surprisal (ablated - baseline, nats unless ``_bits``) of one tag or class.

    Values that are undefined are ``None`` (JSON ``null``, empty in the CSV): the
    shares of excess when the total excess is 0, ``ratio_to_all`` when the overall
    mean excess is 0 (e.g. a condition identical to the baseline).
    """

    model_config = ConfigDict(extra="forbid")

    group: str
    kind: str  # "tag", "class" (FUNCTION / CONTENT) or "all"
    n_tokens: int
    n_words: int
    share_tokens: Optional[float]
    mean_surprisal_baseline: Optional[float]
    mean_surprisal_ablated: Optional[float]
    mean_excess: Optional[float]
    ci_lo: Optional[float]
    ci_hi: Optional[float]
    mean_excess_bits: Optional[float]
    ci_lo_bits: Optional[float]
    ci_hi_bits: Optional[float]
    mean_excess_word: Optional[float]
    word_ci_lo: Optional[float]
    word_ci_hi: Optional[float]
    mean_excess_word_bits: Optional[float]
    share_excess: Optional[float]
    ratio_to_all: Optional[float]


def _stats(**kw: Any) -> GroupStats:
    """GroupStats with every non-finite float (NaN, inf) stored as ``None``."""
    return GroupStats(**{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                         for k, v in kw.items()})


def _group_seed(seed: int, group: str) -> list[int]:
    """The bootstrap seed of one group: ``[seed, crc32(group)]`` (see :func:`aggregate`)."""
    return [int(seed), zlib.crc32(group.encode("utf-8"))]


def aggregate(tags: Sequence[str], word_ids: Sequence[int], base: Sequence[float],
              ablated: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05,
              seed: int = 0) -> list[GroupStats]:
    """Per-tag and per-class statistics of ``excess = ablated - base`` over tokens.

    ``tags[i]``, ``word_ids[i]`` (globally unique per word), ``base[i]`` and
    ``ablated[i]`` (surprisals, nats) describe token ``i``. Rows: every tag present
    (UPOS order, then others sorted), then FUNCTION and CONTENT (if present), then
    ALL. Per-word values sum a word's tokens; a word's tag is its tokens' tag.
    CIs are :func:`eval.stats.bootstrap_mean_ci` over the group's tokens (and, for
    the per-word columns, its words). Bootstrap seeds depend on ``seed`` and the group
    name only, so a group's CI does not change when other groups come and go.
    """
    tg = np.asarray(list(tags), dtype=object)
    wid = np.asarray(word_ids, dtype=np.int64)
    b = np.asarray(base, dtype=np.float64)
    a = np.asarray(ablated, dtype=np.float64)
    if not (tg.size == wid.size == b.size == a.size):
        raise ValueError("tags, word_ids, base and ablated must have the same length")
    ex = a - b
    n_all = ex.size
    total_excess = float(ex.sum())
    mean_all = float(ex.mean()) if n_all else float("nan")

    def row(group: str, kind: str, mask: np.ndarray) -> GroupStats:
        e = ex[mask]
        n = int(e.size)
        # per word: sum of the word's tokens (np.unique sorts by word id)
        uw, inv = np.unique(wid[mask], return_inverse=True)
        per_word = np.zeros(uw.size, dtype=np.float64)
        np.add.at(per_word, inv, e)
        lo, hi = bootstrap_mean_ci(e, n_boot, alpha, _group_seed(seed, group))
        wlo, whi = bootstrap_mean_ci(per_word, n_boot, alpha, _group_seed(seed, "word:" + group))
        mean = float(e.mean()) if n else float("nan")
        wmean = float(per_word.mean()) if uw.size else float("nan")
        return _stats(
            group=group, kind=kind, n_tokens=n, n_words=int(uw.size),
            share_tokens=n / n_all if n_all else float("nan"),
            mean_surprisal_baseline=float(b[mask].mean()) if n else float("nan"),
            mean_surprisal_ablated=float(a[mask].mean()) if n else float("nan"),
            mean_excess=mean, ci_lo=lo, ci_hi=hi,
            mean_excess_bits=mean / LN2, ci_lo_bits=lo / LN2, ci_hi_bits=hi / LN2,
            mean_excess_word=wmean, word_ci_lo=wlo, word_ci_hi=whi,
            mean_excess_word_bits=wmean / LN2,
            share_excess=float(e.sum()) / total_excess if total_excess != 0 else float("nan"),
            ratio_to_all=mean / mean_all if n and mean_all != 0.0 else float("nan"),
        )

    present = set(tg.tolist())
    order = [t for t in UPOS_TAGS if t in present] + sorted(present - set(UPOS_TAGS))
    rows = [row(t, "tag", tg == t) for t in order]
    for name, members in (("FUNCTION", FUNCTION_TAGS), ("CONTENT", CONTENT_TAGS)):
        mask = np.isin(tg, list(members))
        if mask.any():
            rows.append(row(name, "class", mask))
    if n_all:
        rows.append(row("ALL", "all", np.ones(n_all, dtype=bool)))
    return rows


# --------------------------------------------------------------------------- reports


class PosConfig(BaseModel):
    """Everything a POS run depends on (recorded in ``pos.json``)."""

    model_config = ConfigDict(extra="forbid")

    server: str
    model: str  # base model name, no @SET
    sets: list[str]
    out: Path
    tokenizer: Optional[str] = None  # model dir; default: the model name if it is a directory
    start_token: Optional[str] = None
    api_key: Optional[str] = Field(default=None, exclude=True)
    text: Optional[Path] = None  # default WikiText-2 test (raw)
    text_format: TextFormat = "wikitext"
    keep_headings: bool = False
    words: int = 5000
    skip_words: int = 0
    chunk_tokens: int = 256
    tagger: str = "auto"
    data_dir: Optional[Path] = None
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    min_count: int = 20
    cache: Optional[Path] = None
    no_cache: bool = False
    concurrency: int = 4
    batch_size: int = 16
    timeout: float = 600.0
    max_retries: int = 5
    progress: bool = True


class ConditionResult(BaseModel):
    condition: str
    model: str
    n_tokens: int
    n_words: int
    mean_excess: Optional[float]
    groups: list[GroupStats]
    scoring: dict[str, Any]


class PosReport(BaseModel):
    """The content of ``pos.json``."""

    settings: dict[str, Any]
    tagger: dict[str, Any]
    data: dict[str, Any]
    baseline: dict[str, Any]
    conditions: list[ConditionResult]
    alignment_rule: str = ALIGNMENT_RULE
    units: str = "surprisal = -log p(token | prefix) in nats; *_bits = nats / ln 2"
    function_tags: list[str] = list(FUNCTION_TAGS)
    content_tags: list[str] = list(CONTENT_TAGS)

    def condition(self, name: str) -> ConditionResult:
        return next(c for c in self.conditions if c.condition == name)


# --------------------------------------------------------------------------- run


class PosAnalysisError(RuntimeError):
    """The analysis cannot run (server, tokenizer, tagger, text); the message says why."""


def _text_source(cfg: PosConfig) -> tuple[str, Path]:
    from eval.data import default_data_dir, load_wikitext_rows

    if cfg.text is None:
        base = (cfg.data_dir or default_data_dir()) / "wikitext-2"
        path = base / "raw" / "wiki.test.raw"
        if not path.is_file():
            path = base / "test.txt"
    else:
        path = Path(cfg.text).expanduser()
    if not path.is_file():
        raise PosAnalysisError(f"text file not found: {path}")
    if cfg.text_format == "wikitext":
        return "\n".join(r.rstrip("\n") for r in load_wikitext_rows(path)), path
    return path.read_text(encoding="utf-8"), path


def _server_max_len(server: str, base: str, api_key: str | None) -> int | None:
    from server.http import normalize_base_url
    from server.http import ModelListError, list_models

    url = normalize_base_url(server)
    try:
        models = list_models(url, api_key, timeout=30)
    except ModelListError as e:  # "cannot reach URL: ..." / "URL answered STATUS: ..."
        raise PosAnalysisError(str(e)) from e
    ids = [m.get("id") for m in models]
    if base not in ids:
        raise PosAnalysisError(f"model {base!r} is not served at {url} (served: {', '.join(map(str, ids))})")
    mm = next(m for m in models if m.get("id") == base).get("max_model_len")
    return int(mm) if mm else None


class _OffsetEncoder:
    """Token ids *and* character offsets from the same ``tokenizer.json`` the scorer's
    :class:`~eval.tokenizers.LocalTokenizer` reads (ids are checked equal to its ids)."""

    def __init__(self, local_tokenizer: Any) -> None:
        from tokenizers import Tokenizer

        self.lt = local_tokenizer
        self._tok = Tokenizer.from_file(str(Path(local_tokenizer.path) / "tokenizer.json"))
        self._cache: dict[str, tuple[list[int], list[tuple[int, int]]]] = {}

    def __call__(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        hit = self._cache.get(text)
        if hit is None:
            enc = self._tok.encode(text, add_special_tokens=False)
            hit = (list(enc.ids), [tuple(o) for o in enc.offsets])
            if len(self._cache) < 100_000:
                self._cache[text] = hit
        return hit


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, transient=False)


def _score_all(scorer: Any, seqs: list[list[int]], prog: Any, desc: str) -> list[list[float | None]]:
    task = prog.add_task(desc, total=len(seqs))
    step = max(1, scorer.batch_size * scorer.concurrency)
    out: list[list[float | None]] = []
    for i in range(0, len(seqs), step):
        out.extend(asyncio.run(scorer.ascore_ids(seqs[i:i + step])))
        prog.update(task, advance=min(step, len(seqs) - i))
    return out


def run_pos_analysis(cfg: PosConfig) -> PosReport:
    """Run the whole analysis and write the outputs to ``cfg.out``; returns the report."""
    from eval.score_cache import ScoreCache, default_cache_path
    from eval.scoring import CompletionsScorer
    from eval.tokenizers import LocalTokenizer, TokenizerError

    if "@" in cfg.model:
        raise PosAnalysisError(f"--model is the base model name, without @SET (got {cfg.model!r}); "
                               "give the sets with --set")
    sets = list(dict.fromkeys(cfg.sets))
    if not sets:
        raise PosAnalysisError("give at least one condition: --set NAME (a neuron set on the server)")
    bad = [s for s in sets if not s or "@" in s]
    if bad:
        raise PosAnalysisError(f"invalid set names: {bad}")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    tok_src = cfg.tokenizer or (cfg.model if Path(cfg.model).expanduser().is_dir() else None)
    if tok_src is None or tok_src == "server":
        raise PosAnalysisError(
            "the POS analysis needs a local tokenizer (character offsets of every token): "
            "--tokenizer MODEL_DIR (the folder with tokenizer.json)")
    try:
        lt = LocalTokenizer(tok_src, start_token=cfg.start_token)
    except TokenizerError as e:
        raise PosAnalysisError(str(e)) from e
    encode = _OffsetEncoder(lt)

    try:
        tagger = load_tagger(cfg.tagger, cfg.data_dir)  # type: ignore[arg-type]
    except TaggerUnavailableError as e:
        raise PosAnalysisError(str(e)) from e

    max_len = _server_max_len(cfg.server, cfg.model, cfg.api_key)
    # start token + text + one token vLLM generates with echo/max_tokens 0
    budget = cfg.chunk_tokens if max_len is None else min(cfg.chunk_tokens, max_len - 2)

    text, text_path = _text_source(cfg)
    paragraphs = prepare_text(text, cfg.text_format, max_words=cfg.words, skip_words=cfg.skip_words,
                              keep_headings=cfg.keep_headings)
    if not paragraphs:
        raise PosAnalysisError(f"no words in {text_path} (after --skip-words {cfg.skip_words})")
    chunks = build_chunks(paragraphs, encode, budget)
    for c in chunks:  # the ids we align must be the ids the scorer sends
        if lt.encode(c.text) != c.token_ids:
            raise PosAnalysisError(f"tokenizer mismatch on chunk {c.index}: offsets and scorer disagree")
    seqs = [[lt.start_token_id, *c.token_ids] for c in chunks]

    cache: ScoreCache | None = None
    if not cfg.no_cache:
        cache = ScoreCache(cfg.cache or default_cache_path())

    def scorer(model: str) -> CompletionsScorer:
        return CompletionsScorer(
            cfg.server, model, api_key=cfg.api_key, tokenizer=lt,
            cache=cache if cache is not None else False, batch_size=cfg.batch_size,
            concurrency=cfg.concurrency, timeout=cfg.timeout, max_retries=cfg.max_retries,
            progress=False,
        )

    # the baseline is BASE@none: unablated even while the server has a default set
    conditions: list[tuple[str, str]] = [("baseline", f"{cfg.model}@{NO_ABLATION}")] + [
        (s, f"{cfg.model}@{s}") for s in sets]
    surprisal: dict[str, np.ndarray] = {}
    scoring_stats: dict[str, dict[str, Any]] = {}
    try:
        with _progress(cfg.progress) as prog:
            ttask = prog.add_task("tagging", total=1)
            tag_and_align(chunks, tagger)
            prog.update(ttask, advance=1)
            for name, model in conditions:
                with scorer(model) as sc:
                    lps = _score_all(sc, seqs, prog, f"scoring {name}")
                    scoring_stats[name] = {"model": model, **sc.stats()}
                flat: list[float] = []
                for c, lp in zip(chunks, lps, strict=True):
                    if len(lp) != len(c.token_ids) + 1:
                        raise PosAnalysisError(f"chunk {c.index}: {len(lp)} logprobs for "
                                               f"{len(c.token_ids) + 1} tokens")
                    flat.extend(-float(v) for v in lp[1:])  # type: ignore[arg-type]
                surprisal[name] = np.asarray(flat, dtype=np.float64)
    finally:
        if cache is not None:
            cache.close()

    # flat token table (same order for every condition)
    tok_chunk: list[int] = []
    tok_pos: list[int] = []
    tok_tag: list[str] = []
    tok_wid: list[int] = []
    word_base: list[int] = []
    wbase = 0
    for c in chunks:
        word_base.append(wbase)
        for j, w in enumerate(c.token_word):
            tok_chunk.append(c.index)
            tok_pos.append(j)
            tok_tag.append(c.words[w].upos if w >= 0 else NO_WORD_TAG)
            tok_wid.append(wbase + w if w >= 0 else -1 - len(tok_wid))
        wbase += len(c.words)
    base = surprisal["baseline"]

    results: list[ConditionResult] = []
    for name, model in conditions[1:]:
        groups = aggregate(tok_tag, tok_wid, base, surprisal[name], n_boot=cfg.n_boot,
                           alpha=cfg.alpha, seed=cfg.seed)
        allrow = next(g for g in groups if g.group == "ALL")
        results.append(ConditionResult(condition=name, model=model, n_tokens=allrow.n_tokens,
                                       n_words=allrow.n_words, mean_excess=allrow.mean_excess,
                                       groups=groups, scoring=scoring_stats[name]))

    tag_counts: dict[str, int] = {}
    for t in tok_tag:
        tag_counts[t] = tag_counts.get(t, 0) + 1
    n_words_total = sum(len(c.words) for c in chunks)
    n_words_with_tokens = len(set(w for w in tok_wid if w >= 0))
    report = PosReport(
        settings={
            **cfg.model_dump(mode="json", exclude={"api_key", "out"}),
            "text_path": str(text_path),
            "text_sha256": hashlib.sha256(text_path.read_bytes()).hexdigest(),
            "chunk_budget_tokens": budget,
            "server_max_model_len": max_len,
            "tokenizer_info": lt.describe(),
            "conditions": [{"name": n, "model": m} for n, m in conditions],
            "elapsed_s": round(time.perf_counter() - t0, 2),
        },
        tagger=tagger.describe(),
        data={
            "paragraphs": len(paragraphs),
            "chunks": len(chunks),
            "words": n_words_total,
            "words_with_tokens": n_words_with_tokens,
            "tokens": len(tok_tag),
            "tag_token_counts": tag_counts,
        },
        baseline={
            "model": cfg.model,
            "mean_surprisal": float(base.mean()) if base.size else None,
            "mean_surprisal_bits": float(base.mean() / LN2) if base.size else None,
            "scoring": scoring_stats["baseline"],
        },
        conditions=results,
    )
    _write_outputs(out, report, chunks, tok_chunk, tok_pos, tok_tag, tok_wid, surprisal, conditions)
    plot_pos(report, out / "pos_excess.png", min_count=cfg.min_count)
    return report


def _write_outputs(out: Path, report: PosReport, chunks: Sequence[Chunk], tok_chunk: list[int],
                   tok_pos: list[int], tok_tag: list[str], tok_wid: list[int],
                   surprisal: dict[str, np.ndarray], conditions: list[tuple[str, str]]) -> None:
    """pos.json, pos.csv, pos_tokens.jsonl, pos_chunks.jsonl (each written whole, then renamed)."""

    def atomic(path: Path, write: Callable[[Any], None], newline: str | None = None) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8", newline=newline) as fh:
            write(fh)
        os.replace(tmp, path)

    atomic(out / "pos.json", lambda fh: fh.write(report.model_dump_json(indent=2)))

    cols = ["condition", *GroupStats.model_fields]

    def write_csv(fh: Any) -> None:
        w = csv.writer(fh)
        w.writerow(cols)
        for c in report.conditions:
            for g in c.groups:
                d = g.model_dump()
                w.writerow([c.condition, *(d[k] for k in cols[1:])])

    atomic(out / "pos.csv", write_csv, newline="")

    base = surprisal["baseline"]

    def write_tokens(fh: Any) -> None:
        by_index = {c.index: c for c in chunks}
        for name, _ in conditions[1:]:
            abl = surprisal[name]
            for i in range(len(tok_tag)):
                c = by_index[tok_chunk[i]]
                j = tok_pos[i]
                s, e = c.offsets[j]
                w = c.token_word[j]
                word = c.words[w] if w >= 0 else None
                fh.write(json.dumps({
                    "condition": name, "chunk": c.index, "i": j, "token_id": c.token_ids[j],
                    "token": c.text[s:e], "start": s, "end": e,
                    "word_id": tok_wid[i], "word": word.text if word else None,
                    "tag": tok_tag[i], "fine_tag": word.tag if word else None,
                    "surprisal_baseline": float(base[i]), "surprisal_ablated": float(abl[i]),
                    "excess": float(abl[i] - base[i]),
                }, ensure_ascii=False) + "\n")

    atomic(out / "pos_tokens.jsonl", write_tokens)

    def write_chunks(fh: Any) -> None:
        for c in chunks:
            fh.write(json.dumps({"chunk": c.index, "line": c.line, "n_tokens": len(c.token_ids),
                                 "n_words": len(c.words), "text": c.text}, ensure_ascii=False) + "\n")

    atomic(out / "pos_chunks.jsonl", write_chunks)


# --------------------------------------------------------------------------- plot


def plot_pos(report: PosReport, path: Path, *, min_count: int = 20) -> Path:
    """Bar chart of mean excess surprisal per tag (top: per token, bottom: per word),
    one bar per condition, 95% bootstrap CIs as error bars; function-word tags are
    shaded and their labels bold. Tags with fewer than ``min_count`` tokens (in the
    first condition) are left out of the chart (they stay in the JSON/CSV)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = report.conditions
    first = {g.group: g for g in conds[0].groups if g.kind == "tag"}
    shown = [t for t in first if first[t].n_tokens >= min_count]
    fn = [t for t in FUNCTION_TAGS if t in shown]
    ct = [t for t in CONTENT_TAGS if t in shown]
    rest = sorted((t for t in shown if t not in fn and t not in ct), key=lambda t: -first[t].n_tokens)
    order = fn + ct + rest + [g for g in ("FUNCTION", "CONTENT", "ALL")
                              if any(x.group == g for x in conds[0].groups)]
    dropped = [t for t in first if t not in shown]
    n = len(order)
    k = len(conds)
    width = 0.8 / max(k, 1)
    x = np.arange(n)
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.65 * n * max(1, k) ** 0.5 + 3), 8.5), sharex=True)
    colors = plt.get_cmap("tab10").colors
    for ax, per_word in zip(axes, (False, True)):
        if fn:
            ax.axvspan(-0.5, len(fn) - 0.5, color="#fff2cc", zorder=0, label="function-word tags")
        ax.axvline(len(fn) + len(ct) + len(rest) - 0.5, color="0.6", lw=0.8, ls="--")
        for ci, c in enumerate(conds):
            g = {r.group: r for r in c.groups}
            vals, lo, hi = [], [], []
            for t in order:
                r = g.get(t)
                if r is None:
                    vals.append(np.nan), lo.append(0.0), hi.append(0.0)
                    continue
                m = r.mean_excess_word if per_word else r.mean_excess
                a, b = (r.word_ci_lo, r.word_ci_hi) if per_word else (r.ci_lo, r.ci_hi)
                if m is None:
                    vals.append(np.nan), lo.append(0.0), hi.append(0.0)
                    continue
                vals.append(m)
                lo.append(max(0.0, m - a) if a is not None else 0.0)
                hi.append(max(0.0, b - m) if b is not None else 0.0)
            ax.bar(x - 0.4 + width * (ci + 0.5), vals, width, yerr=[lo, hi], capsize=2,
                   color=colors[ci % len(colors)], label=c.condition, zorder=2)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_ylabel("mean excess surprisal (nats)\n" + ("per word" if per_word else "per token"))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(order, rotation=45, ha="right")
    for lbl in axes[1].get_xticklabels():
        if lbl.get_text() in FUNCTION_TAGS or lbl.get_text() == "FUNCTION":
            lbl.set_fontweight("bold")
            lbl.set_color("#9c6500")
    tagger = report.tagger.get("name", report.tagger.get("kind", "?"))
    model = report.baseline.get("model", "")
    title = (f"Excess surprisal under ablation by UPOS tag: {model}\n"
             f"{report.data['tokens']} tokens, {report.data['words']} words; tagger: {tagger}; "
             f"error bars: {round((1 - report.settings.get('alpha', 0.05)) * 100)}% bootstrap CI")
    axes[0].set_title(title, fontsize=10)
    if dropped:
        fig.text(0.01, 0.005, f"not shown (< {min_count} tokens): {', '.join(dropped)}", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI

_HELP = """Which words get harder to predict when a neuron set is ablated? Surprisal change per token, grouped by Universal POS tag.

Scores held-out text (default: WikiText-2 test, detokenized, headings dropped) through the
server's completions API (echo + logprobs; SQLite-cached, so a rerun is instant) with the
base model and with each --set, tags every word (spaCy en_core_web_sm if installed, else
NLTK's tagger from the shared data, mapped to UPOS), aligns each model token to its word
by character offsets, and reports per tag the mean excess surprisal
(ablated - baseline, nats; bits too) per token and per word with bootstrap 95% CIs.

The paper's expectation: the excess concentrates on function words
(DET ADP AUX PRON CCONJ PART) for Wasserstein sets, not for random sets.
Read `ratio_to_all` (tag mean / overall mean) and `share_excess` vs `share_tokens`.

Example, against `negablate serve MODEL_DIR --served-model-name gemma --neuron-sets wd/`:

```
negablate analyze pos --server http://127.0.0.1:8000 --model gemma --tokenizer MODEL_DIR --set wasserstein-top1 --set random-top1-s0 --words 5000 --out report/pos
```

Outputs in --out: pos.json (settings, tagger, per-condition per-tag stats), pos.csv,
pos_tokens.jsonl (token, word, tag, baseline/ablated surprisal), pos_chunks.jsonl,
pos_excess.png (bars per tag and condition, function-word tags shaded).
"""


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def pos_command(
    server: Annotated[str, typer.Option("--server", "-s", envvar="NEGABLATE_SERVER",
                                        help="Server root URL, e.g. http://127.0.0.1:8000.")],
    model: Annotated[str, typer.Option("--model", "-m", help="Served base model name (no @SET); the baseline.")],
    sets: Annotated[list[str], typer.Option("--set", help="A neuron set on the server to compare with the "
                                            "baseline (repeat for several conditions).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("report/pos"),
    tokenizer: Annotated[Optional[str], typer.Option(
        "--tokenizer", "-t", help="Model directory with tokenizer.json (needed for character offsets). "
                                  "Default: --model, if it is a directory.")] = None,
    start_token: Annotated[Optional[str], typer.Option(
        "--start-token", help="Token (string or id) before each chunk. Default: the model's recorded start token, else BOS, else EOS.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="OPENAI_API_KEY",
                                                   help="Bearer token for the completions API.")] = None,
    text: Annotated[Optional[Path], typer.Option(
        "--text", help="Held-out text file. Default: WikiText-2 test (raw) from the data folder.")] = None,
    text_format: Annotated[str, typer.Option(
        "--text-format", help="'wikitext' (tokenized WikiText: detokenized here, ' @-@ ' etc. undone, "
                              "headings dropped) or 'plain' (ordinary text, one paragraph per line).")] = "wikitext",
    keep_headings: Annotated[bool, typer.Option("--keep-headings", help="Keep WikiText '= = Heading = =' lines.")] = False,
    words: Annotated[int, typer.Option("--words", "-n", min=1, help="Words to analyse (whole sentences).")] = 5000,
    skip_words: Annotated[int, typer.Option("--skip-words", min=0, help="Words to skip at the start.")] = 0,
    chunk_tokens: Annotated[int, typer.Option(
        "--chunk-tokens", min=8, help="Most model tokens per scored chunk (whole sentences; also kept "
                                      "below the server's max_model_len).")] = 256,
    tagger: Annotated[str, typer.Option("--tagger", help="auto (spaCy if installed, else NLTK), spacy or nltk.")] = "auto",
    data_dir: Annotated[Optional[Path], typer.Option(
        "--data-dir", help="Data root (wikitext-2/, nltk_data/, pos-tagging/). Default ../shared/data "
                           "or $NEGABLATE_DATA_DIR.")] = None,
    n_boot: Annotated[int, typer.Option("--n-boot", min=1, help="Bootstrap replicates per CI.")] = 1000,
    seed: Annotated[int, typer.Option("--seed", help="Bootstrap seed.")] = 0,
    min_count: Annotated[int, typer.Option("--min-count", min=0, help="Tags with fewer tokens are left "
                                           "out of the chart (kept in JSON/CSV).")] = 20,
    cache: Annotated[Optional[Path], typer.Option("--cache", help="SQLite score cache (default "
                                                  "~/.cache/negablate/eval-scores.sqlite).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Do not read or write the cache.")] = False,
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1, help="Requests in flight.")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Chunks per request.")] = 16,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    from rich.console import Console
    from rich.table import Table

    err = Console(stderr=True)
    if text_format not in ("wikitext", "plain"):
        err.print(f"[bold red]error:[/bold red] --text-format must be wikitext or plain, got {text_format!r}")
        raise typer.Exit(2)
    cfg = PosConfig(server=server, model=model, sets=sets, out=out, tokenizer=tokenizer,
                    start_token=start_token, api_key=api_key, text=text, text_format=text_format,  # type: ignore[arg-type]
                    keep_headings=keep_headings, words=words, skip_words=skip_words,
                    chunk_tokens=chunk_tokens, tagger=tagger, data_dir=data_dir, n_boot=n_boot, seed=seed,
                    min_count=min_count, cache=cache, no_cache=no_cache, concurrency=concurrency,
                    batch_size=batch_size, progress=not quiet)
    try:
        report = run_pos_analysis(cfg)
    except (PosAnalysisError, ValueError) as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console = Console()
    console.print(f"tagger: {report.tagger.get('name')}; {report.data['tokens']} tokens, "
                  f"{report.data['words']} words, {report.data['chunks']} chunks; baseline mean surprisal "
                  f"{report.baseline['mean_surprisal']:.3f} nats/token")
    for c in report.conditions:
        t = Table(title=f"{c.condition}: mean excess surprisal (nats)", show_lines=False)
        for col in ("tag", "tokens", "per token", "95% CI", "per word", "x ALL", "share of excess"):
            t.add_column(col, justify="right" if col != "tag" else "left")
        for g in c.groups:
            if g.kind == "tag" and g.n_tokens < min_count:
                continue
            name = f"[bold]{g.group}[/bold]" if g.group in FUNCTION_TAGS or g.kind != "tag" else g.group
            t.add_row(name, str(g.n_tokens), _fmt(g.mean_excess, "+.4f"),
                      f"[{_fmt(g.ci_lo, '+.4f')}, {_fmt(g.ci_hi, '+.4f')}]",
                      _fmt(g.mean_excess_word, "+.4f"), _fmt(g.ratio_to_all, ".2f"),
                      _fmt(g.share_excess, ".1%"))
        console.print(t)
    console.print(f"wrote {out}/pos.json, pos.csv, pos_tokens.jsonl, pos_chunks.jsonl, pos_excess.png")


def register(app: typer.Typer) -> None:
    """Add ``pos`` to a typer app (``negablate analyze``)."""
    app.command("pos", help=_HELP, no_args_is_help=True)(pos_command)


app = typer.Typer(name="pos", add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown")
register(app)

if __name__ == "__main__":  # python -m eval.analysis.pos --help
    app()
