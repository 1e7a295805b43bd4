"""The perplexity-matched control: random neurons that hurt perplexity as much as a set.

:func:`perplexity_matched_control` takes non-Wasserstein neurons (random ones, or the
lowest-W1 ones), as many as :func:`perplexity_matched` finds (a bracketing search with
interpolation, on a log scale from a start fraction) so that the ablated perplexity
(:func:`offline_perplexity`, on held-out windows) matches the Wasserstein set's. Its own module because it is a search with its own stopping rules, run
on an engine after discovery; the sets it tries come from
:mod:`vllm_negablate.discovery.recipes`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_negablate import set_names
from vllm_negablate.discovery.recipes import candidate_order, fraction_set
from vllm_negablate.neuron_set import NeuronSet

__all__ = [
    "MatchResult",
    "effect_tolerance",
    "perplexity_matched",
    "offline_perplexity",
    "perplexity_matched_control",
]


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
    interpolate: bool = True,
) -> MatchResult:
    """Search the fraction ``f`` of candidates until ``score_fn(f)`` hits the target: bracket
    it, then narrow the bracket by interpolation (:func:`_narrow`).

    With ``start_frac`` (e.g. the Wasserstein set's own size) the search starts there and
    works on a log scale instead: it multiplies or divides ``f`` by 4 until the target is
    bracketed, then narrows it on that scale. The matched count can be anywhere from a few
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
    ``interpolate=False`` halves the bracket instead (the search before interpolation;
    ``bench/matching_search.py`` compares the two).
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
                                  snap, evaluate, result, history, interpolate)
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
    return _narrow(lo, hi, target, limit, max_iter, snap, evaluate, result, history, geometric=False,
                   interpolate=interpolate)


def _search_from_start(start_frac, lo_frac, hi_frac, target, limit, max_iter, n_res, snap,
                       evaluate, result, history, interpolate: bool, growth: float = 4.0) -> MatchResult:
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
    return _narrow(lo, hi, target, limit, max_iter, snap, evaluate, result, history, geometric=True,
                   interpolate=interpolate)


def _narrow(lo, hi, target, limit, max_iter, snap, evaluate, result, history,
            geometric: bool, interpolate: bool = True) -> MatchResult:
    """Shrink the bracket ``lo < target < hi`` until the tolerance, ``max_iter`` calls or
    one-neuron resolution.

    Each step interpolates where the target lies (false position with the Illinois
    rule) in ``log perplexity`` against the fraction, or against ``log fraction`` when
    ``geometric``; ``interpolate=False`` halves the bracket instead. On a smooth curve
    this takes far fewer calls (a log-linear one: 4, the root on the first
    interpolation). On the curves the real searches met it gains little: replayed on
    the 8 recorded SmolLM2-135M searches (``bench/matching_search.py``), 6.4 calls
    against 6.5 on average, because near the target a few more neurons move perplexity
    by about 1% (single neurons with large effects), the size of the tolerance itself.
    Guarded for what interpolation does badly: a step never lands in the outer 5% of
    the bracket (a flat side would otherwise creep), an endpoint kept twice has its
    value halved (Illinois), and an endpoint never evaluated (``lo_frac``, assumed below
    target) makes the step a plain halving (geometric where ``lo > 0``).
    """
    seen = {f: p for f, p in history}

    def coord(f: float) -> float:
        return math.log(f) if geometric else f

    def gap(f: float) -> float | None:  # log(p / target), None when not evaluated
        p = seen.get(f)
        return None if p is None or not p > 0 else math.log(p / target)

    y_lo, y_hi = gap(lo), gap(hi)
    kept = 0  # -1: lo moved last, +1: hi moved last (Illinois)
    while len(history) < max_iter:
        halving = snap(math.sqrt(lo * hi) if geometric and lo > 0 else 0.5 * (lo + hi))
        mid = halving
        if interpolate and y_lo is not None and y_hi is not None and y_hi > y_lo and (lo > 0 or not geometric):
            x_lo, x_hi = coord(lo), coord(hi)
            x = x_hi - y_hi * (x_hi - x_lo) / (y_hi - y_lo)
            margin = 0.05 * (x_hi - x_lo)
            x = min(max(x, x_lo + margin), x_hi - margin)
            mid = snap(math.exp(x) if geometric else x)
            if not lo < mid < hi:
                mid = halving
        if not lo < mid < hi:
            return result(False, "bracket narrower than one neuron")
        p = evaluate(mid)
        seen[mid] = p
        if abs(p - target) <= limit:
            return result(True, "within tolerance")
        y = gap(mid)
        if p < target:
            lo, y_lo = mid, y
            if kept == -1 and y_hi is not None:
                y_hi /= 2
            kept = -1
        else:
            hi, y_hi = mid, y
            if kept == 1 and y_lo is not None:
                y_lo /= 2
            kept = 1
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


def effect_tolerance(share: float, target: float, baseline: float) -> float:
    """The relative perplexity tolerance that is ``share`` of the ablation's effect in log
    space: ``expm1(share * |log(target / baseline)|)``, floored at 1e-6."""
    if not share > 0:
        raise ValueError(f"tol_effect must be > 0, got {share}")
    return max(1e-6, math.expm1(share * abs(math.log(target / baseline))))


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
    pool: str = "random",
    scores: Any = None,
    tol_effect: float | None = None,
    base_perplexity: float | None = None,
) -> tuple[NeuronSet, MatchResult]:
    """Non-``base`` neurons whose ablated perplexity on ``windows`` matches ``base``'s.

    ``pool="random"``: random candidates (seeded); ``pool="bottom"``: the lowest-W1
    candidates per layer (``scores``, the W1 array ``[layers, neurons]``, is then needed):
    the two perplexity-matched controls of the paper's comparison.

    ``tol_effect`` (e.g. 0.1) replaces the relative ``tol`` by a share of the ablation's
    own effect: ``|log p - log p_W| <= tol_effect * (log p_W - log p_base)``. A fixed 2%
    means nothing when the Wasserstein set itself moves perplexity by 2% (Gemma 3 270M,
    top 1%: even the unablated model was "matched"). ``base_perplexity`` saves one
    evaluation when the caller has it.

    Loads ``base`` and a probe set (re-loaded under ``probe_name`` for every fraction) into
    the engine; the probe is unloaded at the end. ``windows`` should be held-out text
    (not the text the neurons were selected on).
    """
    from vllm_negablate.offline import load_neuron_set, unload_neuron_set

    load_neuron_set(llm, base)
    target = offline_perplexity(llm, windows, base.name)
    if tol_effect is not None:
        if base_perplexity is None:
            base_perplexity = offline_perplexity(llm, windows)
        tol = effect_tolerance(tol_effect, target, base_perplexity)
    if pool not in set_names.POOLS:
        raise ValueError(f"pool must be one of {set_names.POOLS}, got {pool!r}")
    if pool == "bottom" and scores is None:
        raise ValueError("pool='bottom' needs the W1 scores")
    order = candidate_order(base, seed=seed, include_wasserstein=include_wasserstein,
                            scores=scores if pool == "bottom" else None)
    draw_seed = seed if pool == "random" else None  # the bottom order uses no randomness

    def score(f: float) -> float:
        probe = fraction_set(base, order, f, probe_name, seed=draw_seed)
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
        name = set_names.perplexity_matched(label, seed, base=base.name, pool=pool)
    extra = {"pool": pool, "target_perplexity": target, "perplexity": match.perplexity,
             "converged": match.converged, "iterations": match.iterations,
             "history": [[float(f), float(p)] for f, p in match.history],
             "tolerance": tol, "tolerance_effect": tol_effect,
             "baseline_perplexity": base_perplexity,
             "eval_tokens": int(sum(len(w) for w in windows)),
             "eval_windows": len(windows), **dict(eval_source or {})}
    return fraction_set(base, order, match.fraction, name, seed=draw_seed, extra=extra), match
