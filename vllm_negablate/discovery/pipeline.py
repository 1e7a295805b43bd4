"""Find Wasserstein neurons with a running vLLM engine, and build the control sets.

The main path runs *inside* vLLM: the plugin's activation wrapper hands every layer's
pre-activations to a :class:`~vllm_negablate.discovery.collector.PreactivationObserver`
on each worker, so discovery uses the same weights, kernels, dtype and tensor
parallelism as the served model, with memory independent of the number of tokens.

:func:`find_neurons` (offline ``vllm.LLM`` with the plugin):

1. tokenizes a corpus with the model's own tokenizer (WikiText-2 rows joined the way
   the reference code does: rows joined with a space, blank rows kept empty),
2. cuts it into windows of ``window_tokens`` tokens (:func:`corpus_windows`), each
   starting with the model's start token (:mod:`vllm_negablate.start_token`: the
   embedded model's marker, else BOS, else EOS; the token evaluation uses too),
3. sends them with ``max_tokens=1`` and no ablation, with a fresh ``cache_salt`` so that
   no window is served from the prefix cache (its tokens would not be observed),
4. collects every TP rank's statistics, puts the shards in global neuron order
   (rank ``r`` holds ``[r*w, (r+1)*w)``), finalizes per layer and checks that every
   layer saw exactly the tokens sent,
5. writes ``stats.npz`` + ``stats.json`` and the neuron sets (``sets/*.json``).

Sets (all mode ``negative`` unless said otherwise, with :class:`Provenance`):

* ``wasserstein-top{p}``: per layer, neurons above the layer's ``(100 - p)``-th percentile
  of W1 (:func:`top_percent_mask`), and ``wasserstein-top{p}-positive`` (mirror control);
* ``random-top{p}-s{seed}``: per layer, as many random neurons as the Wasserstein set,
  excluding it unless ``include_wasserstein``;
* :func:`restrict_layers`: ``...-layer{L}`` / ``...-first{k}`` variants of any set;
* :func:`perplexity_matched_control`: random non-Wasserstein neurons, the fraction found
  by :func:`perplexity_matched` (bisection) so that the ablated perplexity matches the
  Wasserstein set's.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from vllm_negablate import set_names, vllm_adapter
from vllm_negablate.discovery.collector import (
    ObserverConfig,
    from_wire,
    merge_tp_scores,
    merge_tp_states,
)
from vllm_negablate.discovery.streaming import StreamingW1Estimator
from vllm_negablate.discovery.wasserstein import top_percent_mask
from vllm_negablate.neuron_set import (
    AblationMode,
    LayerAblation,
    ModelFingerprint,
    NeuronSet,
    Provenance,
    percent_label,
)
from vllm_negablate.paths import sha256_file, wikitext
from vllm_negablate.start_token import StartTokenError
from vllm_negablate.start_token import start_token_id as rule_start_token_id

DEFAULT_CORPUS = wikitext("valid")
DEFAULT_EVAL_CORPUS = wikitext("test")
STAT_KEYS = ("w1", "w1_negative", "w1_positive", "mean", "std", "skew", "kurtosis", "out_of_range")
STATS_FILE, META_FILE, SETS_DIR = "stats.npz", "stats.json", "sets"

__all__ = [
    "DiscoveryError",
    "DiscoveryResult",
    "MatchResult",
    "find_neurons",
    "read_corpus_text",
    "tokenize_corpus",
    "make_windows",
    "corpus_windows",
    "CorpusWindows",
    "engine_model_path",
    "save_statistics",
    "load_statistics",
    "wasserstein_set",
    "random_control",
    "restrict_layers",
    "mode_variant",
    "candidate_order",
    "fraction_set",
    "perplexity_matched",
    "offline_perplexity",
    "perplexity_matched_control",
    "percent_label",
]


class DiscoveryError(RuntimeError):
    """Discovery could not produce trustworthy statistics."""


# ------------------------------------------------------------------------ corpus
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


def engine_model_path(llm: Any) -> str:
    """The model an offline ``vllm.LLM`` serves (a directory, or a hub id)."""
    return vllm_adapter.engine_model_path(llm)


# ------------------------------------------------------------------ statistics
def _stack_layers(per_layer: Mapping[int, Mapping[str, np.ndarray]], num_layers: int):
    missing = [layer for layer in range(num_layers) if layer not in per_layer]
    if missing:
        raise DiscoveryError(f"no statistics for layers {missing}")
    stats = {k: np.stack([np.asarray(per_layer[i][k], dtype=np.float64) for i in range(num_layers)])
             for k in STAT_KEYS}
    stats["count"] = np.array([int(np.asarray(per_layer[i]["count"]).reshape(-1)[0])
                               for i in range(num_layers)], dtype=np.int64)
    return stats


def save_statistics(out_dir: str | Path, stats: Mapping[str, np.ndarray],
                    metadata: Mapping[str, Any]) -> tuple[Path, Path]:
    """``stats.npz`` (arrays ``[layers, neurons]`` + ``count [layers]``) and ``stats.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    npz = out / STATS_FILE
    tmp = out / f".{STATS_FILE}.tmp.npz"
    np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in stats.items()})
    tmp.replace(npz)
    meta = out / META_FILE
    meta.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")
    return npz, meta


def load_statistics(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`save_statistics` wrote (a directory or its ``stats.npz``)."""
    path = Path(path)
    npz = path / STATS_FILE if path.is_dir() else path
    meta_path = npz.with_name(META_FILE)
    with np.load(npz) as data:
        stats = {k: data[k] for k in data.files}
    metadata = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return stats, metadata


# ------------------------------------------------------------------------- sets
def wasserstein_set(
    scores: np.ndarray,
    fingerprint: ModelFingerprint,
    top_percent: float = 1.0,
    *,
    mode: AblationMode | str = AblationMode.NEGATIVE,
    name: str | None = None,
    source: Mapping[str, Any] | None = None,
) -> NeuronSet:
    """Per layer, the neurons with W1 above the layer's ``(100 - p)``-th percentile."""
    scores = np.asarray(scores)
    if scores.shape != (fingerprint.num_layers, fingerprint.intermediate_size):
        raise ValueError(
            f"scores have shape {scores.shape}, the model needs "
            f"({fingerprint.num_layers}, {fingerprint.intermediate_size})"
        )
    mode = AblationMode(mode)
    entries = [
        LayerAblation(layer=layer, neurons=np.flatnonzero(top_percent_mask(row, top_percent)).tolist(),
                      mode=mode)
        for layer, row in enumerate(scores)
    ]
    label = percent_label(top_percent)
    if name is None:
        name = set_names.wasserstein_top(top_percent, mode)
    src = {**dict(source or {}), "top_percent": float(top_percent),
           "percentile": 100.0 - float(top_percent), "score": "w1"}
    return NeuronSet(
        name=name, model=fingerprint, entries=[e for e in entries if e.neurons],
        provenance=Provenance(method="wasserstein-top", source=src),
        description=f"Top {label}% W1-to-N(0,1) neurons per layer, {mode.value} ablation.",
    )


def _neurons_of(ns: NeuronSet) -> dict[int, np.ndarray]:
    out: dict[int, list[int]] = {}
    for e in ns.entries:
        out.setdefault(e.layer, []).extend(e.neurons)
    return {layer: np.array(sorted(v), dtype=np.int64) for layer, v in out.items()}


def _derived(base: NeuronSet, name: str, entries: list[LayerAblation], method: str,
             seed: int | None, extra: Mapping[str, Any], description: str) -> NeuronSet:
    src = {**base.provenance.source, "base_set": base.name,
           "base_content_hash": base.content_hash(), **dict(extra)}
    return NeuronSet(name=name, model=base.model, entries=[e for e in entries if e.neurons],
                     provenance=Provenance(method=method, seed=seed, source=src),
                     description=description)


def _pool(base: NeuronSet, layer: int, include_base: bool) -> np.ndarray:
    all_neurons = np.arange(base.model.intermediate_size, dtype=np.int64)
    if include_base:
        return all_neurons
    return np.setdiff1d(all_neurons, _neurons_of(base).get(layer, np.empty(0, np.int64)))


def random_control(
    base: NeuronSet,
    *,
    seed: int = 0,
    include_wasserstein: bool = False,
    mode: AblationMode | str = AblationMode.NEGATIVE,
    name: str | None = None,
) -> NeuronSet:
    """Per layer, as many uniformly random neurons as ``base`` has there (seeded).

    Neurons of ``base`` are excluded unless ``include_wasserstein`` (the reference code
    draws from all neurons). Each layer has its own generator (``seed``, layer), so a
    layer's draw does not depend on the other layers.
    """
    entries = []
    for layer, count in base.counts_per_layer().items():
        pool = _pool(base, layer, include_wasserstein)
        rng = np.random.default_rng([int(seed), int(layer)])
        pick = rng.choice(pool, size=min(count, pool.size), replace=False)
        entries.append(LayerAblation(layer=layer, neurons=sorted(int(n) for n in pick), mode=mode))
    label = base.provenance.source.get("top_percent")
    if name is None:
        name = set_names.random_control(label, seed, base=base.name, include_base=include_wasserstein)
    return _derived(base, name, entries, "random", seed,
                    {"exclude_base": not include_wasserstein, "matched_counts": True},
                    f"Random neurons, same per-layer counts as {base.name}"
                    + ("" if include_wasserstein else f", excluding {base.name}") + ".")


def restrict_layers(base: NeuronSet, layers: Sequence[int], name: str | None = None,
                    suffix: str | None = None) -> NeuronSet:
    """``base`` with only the entries of ``layers`` (``...-layer{L}``, ``...-first{k}``)."""
    keep = {int(x) for x in layers}
    bad = sorted(x for x in keep if not 0 <= x < base.model.num_layers)
    if bad:
        raise ValueError(f"layers {bad} out of range (model has {base.model.num_layers})")
    if name is None:
        name = f"{base.name}-{suffix}" if suffix is not None else \
            set_names.layer_restricted(base.name, sorted(keep))
    entries = [e.model_copy() for e in base.entries if e.layer in keep]
    prov = base.provenance.model_copy(deep=True)
    prov.source = {**prov.source, "base_set": base.name, "layers": sorted(keep)}
    return NeuronSet(name=name, model=base.model, entries=entries, provenance=prov,
                     description=f"{base.name} restricted to layers {sorted(keep)}.")


def mode_variant(base: NeuronSet, mode: AblationMode | str, name: str | None = None) -> NeuronSet:
    """The same neurons with another ablation mode (e.g. the ``positive`` mirror control)."""
    mode = AblationMode(mode)
    entries = [LayerAblation(layer=e.layer, neurons=list(e.neurons), mode=mode) for e in base.entries]
    prov = base.provenance.model_copy(deep=True)
    prov.source = {**prov.source, "mode": mode.value}
    return NeuronSet(name=name or set_names.mode_variant(base.name, mode), model=base.model, entries=entries,
                     provenance=prov, description=f"{base.name} with {mode.value} ablation.")


# ----------------------------------------------------------- perplexity matching
def candidate_order(base: NeuronSet, *, seed: int = 0,
                    include_wasserstein: bool = False) -> dict[int, np.ndarray]:
    """Per layer of ``base``, a seeded random order of the candidate (non-base) neurons.

    :func:`fraction_set` takes them in this order, so the sets are nested as ``f`` grows
    and the ablated perplexity is (close to) monotone in ``f``.
    """
    order = {}
    for layer in base.counts_per_layer():
        pool = _pool(base, layer, include_wasserstein)
        order[layer] = np.random.default_rng([int(seed), int(layer), 1]).permutation(pool)
    return order


def fraction_set(base: NeuronSet, order: Mapping[int, np.ndarray], fraction: float,
                 name: str, mode: AblationMode | str = AblationMode.NEGATIVE,
                 extra: Mapping[str, Any] | None = None, seed: int | None = None) -> NeuronSet:
    """``round(fraction * total)`` candidates, spread over layers in proportion to their
    candidate counts.

    Candidate ``i`` of layer ``l`` enters at fraction ``(i + 1) / len(order[l])``; all
    candidates are taken in that order (ties: lower layer first). Every layer then holds
    ``fraction * len(order[l])`` neurons up to one, the sets are nested in ``fraction``,
    and the resolution is one neuron in the whole model (not one per layer).
    """
    layers = sorted(order)
    keys, lays, pos = [], [], []
    for layer in layers:
        n = len(order[layer])
        keys.append((np.arange(n) + 1.0) / max(n, 1))
        lays.append(np.full(n, layer))
        pos.append(np.arange(n))
    key, lay, idx = (np.concatenate(x) if x else np.empty(0) for x in (keys, lays, pos))
    take = int(round(float(fraction) * key.size))
    chosen = np.lexsort((lay, key))[:take]
    per_layer: dict[int, list[int]] = {layer: [] for layer in layers}
    for j in chosen:
        per_layer[int(lay[j])].append(int(order[int(lay[j])][int(idx[j])]))
    entries = [LayerAblation(layer=layer, neurons=sorted(per_layer[layer]), mode=mode)
               for layer in layers]
    return _derived(base, name, entries, "perplexity-matched", seed,
                    {"fraction": float(fraction), "candidates": int(key.size), **dict(extra or {})},
                    f"Random non-{base.name} neurons ({fraction:.4g} of the candidates).")


@dataclass
class MatchResult:
    """Outcome of :func:`perplexity_matched`."""

    fraction: float
    perplexity: float
    target: float
    converged: bool
    iterations: int  # score_fn calls
    history: list[tuple[float, float]] = field(default_factory=list)
    reason: str = ""



def perplexity_matched(
    score_fn: Callable[[float], float],
    target_ppl: float,
    candidates_order: Mapping[int, Sequence[int]] | int | None = None,
    lo_frac: float = 0.0,
    hi_frac: float = 1.0,
    tol: float = 0.01,
    max_iter: int = 20,
    *,
    relative: bool = True,
    progress: Callable[[int, float, float], None] | None = None,
    start_frac: float | None = None,
) -> MatchResult:
    """Bisection over the fraction ``f`` of candidates until ``score_fn(f)`` hits the target.

    With ``start_frac`` (e.g. the Wasserstein set's own size) the search starts there and
    works on a log scale instead: it multiplies or divides ``f`` by 4 until the target is
    bracketed, then bisects geometrically. The matched count can be anywhere from a few
    neurons to most of the model, and a linear bisection from ``[0, 1]`` spends its first
    steps far from a small count (seen on Gemma 3 270M: six steps ended at 1/16 of the
    candidates, still 2x the target perplexity).

    ``score_fn(f)`` must increase with ``f`` (ablating more neurons hurts more). Stops when
    ``|ppl - target| <= tol * target`` (``relative``) or ``<= tol``; when ``max_iter``
    calls of ``score_fn`` are spent; or when the bracket is narrower than one neuron
    (``candidates_order``: the per-layer candidate lists, whose total length sets that
    resolution as in :func:`fraction_set`, or the number of candidates; fractions are
    snapped to it). The bracket is checked first:
    ``score_fn(hi_frac)`` (the target may be out of reach), then ``score_fn(lo_frac)``.
    Returns the best point seen, ``converged`` saying whether it is within ``tol``.
    """
    if not 0.0 <= lo_frac < hi_frac:
        raise ValueError(f"need 0 <= lo_frac < hi_frac, got {lo_frac}, {hi_frac}")
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    if candidates_order is None:
        n_res = None
    elif isinstance(candidates_order, int):
        n_res = candidates_order
    else:
        n_res = sum(len(v) for v in candidates_order.values()) or None
    target = float(target_ppl)
    limit = tol * abs(target) if relative else tol

    def snap(f: float) -> float:
        return f if n_res is None else round(f * n_res) / n_res

    history: list[tuple[float, float]] = []

    def evaluate(f: float) -> float:
        p = float(score_fn(f))
        history.append((f, p))
        if progress is not None:
            progress(len(history), f, p)
        return p

    def result(converged: bool, reason: str) -> MatchResult:
        f, p = min(history, key=lambda fp: (abs(fp[1] - target), fp[0]))
        return MatchResult(f, p, target, converged and abs(p - target) <= limit,
                           len(history), history, reason)

    if start_frac is not None:
        return _search_from_start(start_frac, lo_frac, hi_frac, target, limit, max_iter, n_res,
                                  snap, evaluate, result, history)
    lo, hi = snap(lo_frac), snap(hi_frac)
    p_hi = evaluate(hi)
    if abs(p_hi - target) <= limit:
        return result(True, "hi_frac within tolerance")
    if p_hi < target or math.isnan(p_hi):
        return result(False, f"target not reached: perplexity {p_hi:.4g} at fraction {hi:.4g}")
    if len(history) >= max_iter:
        return result(False, "max_iter")
    p_lo = evaluate(lo)
    if abs(p_lo - target) <= limit:
        return result(True, "lo_frac within tolerance")
    if p_lo > target:
        return result(False, f"already above target at fraction {lo:.4g} ({p_lo:.4g})")
    return _bisect(lo, hi, target, limit, max_iter, snap, evaluate, result, history, geometric=False)


def _search_from_start(start_frac, lo_frac, hi_frac, target, limit, max_iter, n_res, snap,
                       evaluate, result, history, growth: float = 4.0) -> MatchResult:
    """The log-scale search of :func:`perplexity_matched` (see there).

    ``lo_frac`` is taken to be below the target without evaluating it (the target is an
    ablated perplexity, so above the unablated one).
    """
    smallest = max(lo_frac, 1.0 / n_res if n_res else 1e-6)  # one neuron
    f = snap(min(hi_frac, max(smallest, start_frac)))
    lo, hi = lo_frac, None
    while True:  # bracket the target by factors of `growth`
        p = evaluate(f)
        if abs(p - target) <= limit:
            return result(True, "within tolerance")
        if p < target:
            lo = f
            if hi is not None:
                break
            if f >= hi_frac:
                return result(False, f"target not reached: perplexity {p:.4g} at fraction {f:.4g}")
            f = snap(min(hi_frac, f * growth))
        else:
            hi = f
            if lo > lo_frac:
                break
            if f <= smallest:
                return result(False, f"already above target with one neuron ({p:.4g})")
            f = snap(max(smallest, f / growth))
        if len(history) >= max_iter:
            return result(False, "max_iter")
    return _bisect(lo, hi, target, limit, max_iter, snap, evaluate, result, history, geometric=True)


def _bisect(lo, hi, target, limit, max_iter, snap, evaluate, result, history,
            geometric: bool) -> MatchResult:
    """Shrink the bracket ``lo < target < hi`` until the tolerance, ``max_iter`` calls or
    one-neuron resolution; ``geometric`` halves it on a log scale (where ``lo > 0``)."""
    while len(history) < max_iter:
        mid = snap(math.sqrt(lo * hi) if geometric and lo > 0 else 0.5 * (lo + hi))
        if not lo < mid < hi:
            return result(False, "bracket narrower than one neuron")
        p = evaluate(mid)
        if abs(p - target) <= limit:
            return result(True, "within tolerance")
        if p < target:
            lo = mid
        else:
            hi = mid
    return result(False, "max_iter")


def offline_perplexity(llm: Any, windows: Sequence[Sequence[int]],
                       neuron_set_name: str | None = None) -> float:
    """``exp`` of the mean NLL over all predicted tokens of ``windows`` (first token of
    each window is context only), with ``neuron_set_name`` applied (None: no ablation)."""
    from vllm_negablate.offline import score_prompts

    rows = score_prompts(llm, windows, neuron_set=neuron_set_name)
    nll = [-lp for row in rows for lp in row if lp is not None]
    if not nll:
        raise ValueError("no predicted tokens (windows of length < 2)")
    return float(math.exp(sum(nll) / len(nll)))


def perplexity_matched_control(
    llm: Any,
    base: NeuronSet,
    windows: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    include_wasserstein: bool = False,
    lo_frac: float = 0.0,
    hi_frac: float = 1.0,
    tol: float = 0.02,
    max_iter: int = 12,
    name: str | None = None,
    probe_name: str = "negablate-ppl-probe",
    eval_source: Mapping[str, Any] | None = None,
    progress: Callable[[int, float, float], None] | None = None,
) -> tuple[NeuronSet, MatchResult]:
    """Random non-``base`` neurons whose ablated perplexity on ``windows`` matches ``base``'s.

    Loads ``base`` and a probe set (re-loaded under ``probe_name`` for every fraction) into
    the engine; the probe is unloaded at the end. ``windows`` should be held-out text
    (not the text the neurons were selected on).
    """
    from vllm_negablate.offline import load_neuron_set, unload_neuron_set

    load_neuron_set(llm, base)
    target = offline_perplexity(llm, windows, base.name)
    order = candidate_order(base, seed=seed, include_wasserstein=include_wasserstein)

    def score(f: float) -> float:
        probe = fraction_set(base, order, f, probe_name, seed=seed)
        load_neuron_set(llm, probe)
        return offline_perplexity(llm, windows, probe_name)

    try:
        n_candidates = sum(len(v) for v in order.values())
        start = base.num_neurons() / n_candidates if n_candidates else None  # equal count first
        match = perplexity_matched(score, target, order, lo_frac, hi_frac, tol, max_iter,
                                   progress=progress, start_frac=start)
    finally:
        try:
            unload_neuron_set(llm, probe_name)
        except Exception:  # never loaded (first score failed)
            pass
    label = base.provenance.source.get("top_percent")
    if name is None:
        name = set_names.perplexity_matched(label, seed, base=base.name)
    extra = {"target_perplexity": target, "perplexity": match.perplexity,
             "converged": match.converged, "iterations": match.iterations,
             "tolerance": tol, "eval_tokens": int(sum(len(w) for w in windows)),
             "eval_windows": len(windows), **dict(eval_source or {})}
    return fraction_set(base, order, match.fraction, name, seed=seed, extra=extra), match


# --------------------------------------------------------------------- the run
@dataclass
class DiscoveryResult:
    stats: dict[str, np.ndarray]  # STAT_KEYS: [layers, neurons]; count: [layers]
    metadata: dict[str, Any]
    windows: list[list[int]]
    sets: dict[str, NeuronSet]
    states: dict[int, dict[str, Any]] | None = None  # merged estimator states (collect="state")
    exact: dict[int, np.ndarray] | None = None  # kept raw values [n, neurons] per layer
    paths: dict[str, Path] = field(default_factory=dict)
    worker_memory: list[dict[str, Any]] = field(default_factory=list)


def _rpc(llm: Any, method: str, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    replies = llm.collective_rpc(method, args=args, kwargs=kwargs or None)
    errors = sorted({str(r.get("error")) for r in replies if not r.get("ok")})
    if errors:
        raise DiscoveryError(f"{method}: " + "; ".join(errors))
    return replies


def fingerprint_of_llm(llm: Any) -> ModelFingerprint:
    from vllm_negablate.offline import ablation_state

    return ModelFingerprint(**ablation_state(llm)["fingerprint"])


def run_observed(
    llm: Any,
    windows: Sequence[Sequence[int]],
    config: ObserverConfig | None = None,
    *,
    use_tqdm: bool = True,
    finalize_on_workers: bool = True,
    reset_peak_memory: bool = False,
) -> list[dict[str, Any]]:
    """Send ``windows`` (max_tokens=1, no ablation, fresh cache salt) with an observer
    on every worker; return the decoded collect replies of all workers."""
    from vllm import SamplingParams

    cfg = (config or ObserverConfig()).model_dump()
    cfg["reset_peak_memory"] = reset_peak_memory
    _rpc(llm, "negablate_observe_start", json.dumps(cfg))
    try:
        salt = f"negablate-discovery-{uuid.uuid4().hex}"
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
        llm.generate([{"prompt_token_ids": list(w), "cache_salt": salt} for w in windows],
                     params, use_tqdm=use_tqdm)
    finally:
        _rpc(llm, "negablate_observe_stop")
    replies = _rpc(llm, "negablate_observe_collect", finalize=finalize_on_workers, clear=True)
    return [from_wire(r) for r in replies]


def find_neurons(
    llm: Any,
    corpus_path: str | Path = DEFAULT_CORPUS,
    *,
    window_tokens: int = 512,
    max_tokens: int | None = 131_072,
    top_percent: float = 1.0,
    seed: int = 0,
    include_wasserstein: bool = False,
    out_dir: str | Path | None = None,
    joiner: str = " ",
    stride: int | None = None,
    estimator: Mapping[str, Any] | None = None,
    keep_exact: int = 0,
    collect: str = "scores",
    use_tqdm: bool = True,
) -> DiscoveryResult:
    """Wasserstein neurons of the model served by ``llm`` (see the module docstring).

    ``estimator``: :class:`StreamingW1Estimator` settings (``nbins``, ``warmup_tokens``,
    ``core_scale``, ``range_std``, ``lattice``) and ``device`` ('auto' or 'cpu').
    ``collect="scores"`` finalizes on each worker (exact: scores are per neuron) and
    transfers ~10 floats per neuron; ``"state"`` transfers the estimator states and
    finalizes here (also returned in ``result.states``, and saved as ``state.npz``).
    ``keep_exact=N`` keeps the first N raw values per neuron; when they cover all the
    tokens, the metadata reports the streaming estimator's max error against exact W1.
    """
    import vllm

    if collect not in ("scores", "state"):
        raise ValueError("collect must be 'scores' or 'state'")
    corpus_path = Path(corpus_path)
    max_len = vllm_adapter.engine_max_model_len(llm)
    if window_tokens >= max_len:
        raise DiscoveryError(
            f"window_tokens={window_tokens} must be < max_model_len={max_len} "
            "(one token is generated); start the engine with a larger max_model_len"
        )
    model_path = engine_model_path(llm)
    cut = corpus_windows(llm.get_tokenizer(), model_path, corpus_path, window_tokens,
                         joiner=joiner, max_tokens=max_tokens, stride=stride)
    start_id, windows = cut.start_id, cut.windows
    if not windows:
        raise DiscoveryError(f"{corpus_path}: no tokens")
    num_tokens = sum(len(w) for w in windows)
    fingerprint = fingerprint_of_llm(llm)

    config = ObserverConfig(**{**dict(estimator or {}), "keep_exact": keep_exact})
    replies = run_observed(llm, windows, config, use_tqdm=use_tqdm,
                           finalize_on_workers=(collect == "scores"))

    for r in replies:
        bad = {layer: n for layer, n in r["tokens"].items() if n != num_tokens}
        if bad:
            raise DiscoveryError(
                f"tp rank {r['tp_rank']}: layers saw {bad} tokens, {num_tokens} were sent. "
                "Steps replayed from CUDA graphs or served from the prefix cache are not "
                "observed: run discovery with enforce_eager=True."
            )
    states = None
    if collect == "state":
        states = merge_tp_states(replies)
        per_layer = {layer: StreamingW1Estimator.from_state_dict(st).finalize()
                     for layer, st in states.items()}
    else:
        per_layer = merge_tp_scores(replies)
    stats = _stack_layers(per_layer, fingerprint.num_layers)
    if stats["w1"].shape[1] != fingerprint.intermediate_size:
        raise DiscoveryError(f"merged width {stats['w1'].shape[1]} != intermediate_size "
                             f"{fingerprint.intermediate_size}")

    exact = None
    if keep_exact:
        exact = {}
        for layer in range(fingerprint.num_layers):
            parts = sorted(((r["tp_rank"], r["exact"][layer]) for r in replies
                            if layer in r["exact"]), key=lambda rp: rp[0])
            exact[layer] = np.concatenate([p for _, p in parts], axis=1)

    estimator_settings = config.model_dump(exclude={"max_tokens", "layers"})
    metadata: dict[str, Any] = {
        "model": fingerprint.model_dump(),
        "model_path": model_path,
        "dtype": vllm_adapter.engine_dtype(llm),
        "tp_size": int(replies[0]["tp_size"]),
        "corpus": str(corpus_path.resolve()),
        "corpus_sha256": sha256_file(corpus_path),
        "corpus_joiner": joiner,
        "num_tokens": int(num_tokens),
        "num_windows": len(windows),
        "window_tokens": int(window_tokens),
        "stride": stride,
        "start_token_id": start_id,
        "estimator": estimator_settings,
        "collect": collect,
        "top_percent": float(top_percent),
        "seed": int(seed),
        "vllm_version": vllm.__version__,
        "negablate_version": _negablate_version(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if exact is not None and all(exact[i].shape[0] == num_tokens for i in exact):
        from vllm_negablate.discovery.wasserstein import exact_w1_to_std_normal_columns

        errs = []
        for layer in range(fingerprint.num_layers):
            x = exact[layer].astype(np.float64)
            sd = x.std(axis=0)
            ref = exact_w1_to_std_normal_columns((x - x.mean(axis=0)) / np.where(sd > 0, sd, np.nan))
            errs.append(float(np.nanmax(np.abs(ref - stats["w1"][layer]))))
        metadata["streaming_w1_max_abs_error"] = max(errs)
        metadata["streaming_w1_max_abs_error_per_layer"] = errs

    source = {"corpus": metadata["corpus"], "corpus_sha256": metadata["corpus_sha256"],
              "tokens": int(num_tokens), "window_tokens": int(window_tokens),
              "model_path": model_path, "statistics": STATS_FILE}
    wset = wasserstein_set(stats["w1"], fingerprint, top_percent, source=source)
    sets = {
        wset.name: wset,
        set_names.wasserstein_top(top_percent, AblationMode.POSITIVE): mode_variant(wset, AblationMode.POSITIVE),
    }
    rnd = random_control(wset, seed=seed, include_wasserstein=include_wasserstein)
    sets[rnd.name] = rnd

    result = DiscoveryResult(stats=stats, metadata=metadata, windows=[list(w) for w in windows],
                             sets=sets, states=states, exact=exact,
                             worker_memory=[r.get("memory", {}) for r in replies])
    if out_dir is not None:
        out = Path(out_dir)
        npz, meta = save_statistics(out, stats, metadata)
        result.paths = {"stats": npz, "metadata": meta}
        for ns in sets.values():
            result.paths[ns.name] = ns.save(out / SETS_DIR / f"{ns.name}.json")
        if states is not None:
            flat = {f"L{layer}/{k}": np.asarray(v) for layer, st in states.items() for k, v in st.items()
                    if v is not None}
            np.savez_compressed(out / "state.npz", **flat)
            result.paths["state"] = out / "state.npz"
    return result


def _negablate_version() -> str:
    from vllm_negablate import __version__

    return __version__
