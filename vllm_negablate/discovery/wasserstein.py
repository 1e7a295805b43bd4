"""Wasserstein-1 distance of a neuron's standardized pre-activations to N(0, 1): the math.

Pure functions only (numpy, scipy.special): exact W1 of a sample, exact W1 of a
piecewise-uniform distribution (a histogram), and the top-percent selection rule. No
state, no torch, nothing from vLLM, so the definitions can be tested, and used
offline, on their own. The streaming estimator that gathers the histograms during
discovery is :mod:`vllm_negablate.discovery.streaming`; it imports this module, never
the reverse.

Definitions (see ``docs/science.md``, "Wasserstein neurons"):

* A neuron's pre-activations ``h`` over tokens are standardized, ``z = (h - mean) / std``
  with the population standard deviation (``ddof=0``, numpy's default).
* Its score is the 1-D Wasserstein-1 distance between the empirical distribution of ``z``
  (weight ``1/N`` per token) and the standard normal distribution,

      W1 = integral over x of |F_n(x) - Phi(x)| dx.

  The reference code estimates this with one random N(0, 1) sample of the same size; here
  it is computed *exactly*: ``F_n`` is constant (``k/N``) between consecutive order
  statistics, and ``integral |c - Phi|`` over an interval has a closed form through the
  antiderivative of Phi, ``G(x) = x Phi(x) + phi(x)``, split at ``x = Phi^{-1}(c)``.
  The two infinite tails have closed forms too (``G(z_min)`` and ``G(-z_max)``).
* ``w1_negative`` is the part of the same integral over the negative half of the
  *standardized* axis (``z < 0``); ``w1 = w1_negative + w1_positive`` exactly.
* ``w1_below(s)`` is the part over ``z < s`` for any split ``s`` per neuron; at
  ``s = -mean/std`` it is the part at negative *raw* pre-activations (``h < 0``), the
  side the paper's ablation zeroes (:func:`exact_w1_below_columns`,
  :func:`w1_histogram_below`).

Numerics: every piece on the positive half-axis is mirrored onto the negative one
(``x -> -x``, ``F -> 1 - F``), so ``Phi`` and ``G`` are only ever evaluated where they are
small and accurate.

:class:`vllm_negablate.discovery.streaming.StreamingW1Estimator` computes the same scores
from one pass over batches of pre-activations with memory independent of the number of
tokens (see its docstring).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import ndtr, ndtri

__all__ = [
    "std_normal_cdf_antiderivative",
    "standardize_columns",
    "exact_w1_to_std_normal",
    "exact_w1_to_std_normal_columns",
    "exact_w1_split_columns",
    "w1_negative_part",
    "w1_negative_part_columns",
    "w1_histogram_to_std_normal",
    "exact_w1_below_columns",
    "w1_histogram_below",
    "top_percent_mask",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # phi(0)
_G0 = _INV_SQRT_2PI  # G(0) = 0 * Phi(0) + phi(0)


# --------------------------------------------------------------------------------------
# Closed forms
# --------------------------------------------------------------------------------------


def _phi(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * np.square(x)) * _INV_SQRT_2PI


def std_normal_cdf_antiderivative(x: np.ndarray | float) -> np.ndarray:
    """``G(x) = x Phi(x) + phi(x)``, the antiderivative of Phi with ``G(-inf) = 0``.

    ``G(-x) = G(x) - x``; ``integral_{x}^{inf} (1 - Phi) = G(-x)``. Finite inputs only.
    """
    x = np.asarray(x, dtype=np.float64)
    return x * ndtr(x) + _phi(x)


_G = std_normal_cdf_antiderivative


def _int_abs_const(c: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``integral_a^b |c - Phi(x)| dx`` for ``a <= b`` (finite), ``0 <= c <= 1``.

    ``c - Phi`` is decreasing, with its only root at ``t = Phi^{-1}(c)``; with ``t``
    clipped into ``[a, b]`` the integral is ``c (2t - a - b) + G(a) + G(b) - 2 G(t)``.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.minimum(np.maximum(ndtri(c), a), b)
    return c * (2.0 * t - a - b) + _G(a) + _G(b) - 2.0 * _G(t)


def _tails(e0: np.ndarray, e1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Negative and positive parts of the two tails: F = 0 below ``e0``, F = 1 above ``e1``.

    Left tail, ``|F - Phi| = Phi`` on ``(-inf, e0)``; right tail, ``1 - Phi`` on ``(e1, inf)``.
    """
    e0 = np.asarray(e0, dtype=np.float64)
    e1 = np.asarray(e1, dtype=np.float64)
    neg = _G(np.minimum(e0, 0.0))
    # integral_0^{e0} Phi = e0 - integral_{-e0}^0 Phi = e0 - (G(0) - G(-e0))
    ep = np.maximum(e0, 0.0)
    pos = np.where(e0 > 0, ep - (_G0 - _G(-ep)), 0.0)
    pos = pos + _G(-np.maximum(e1, 0.0))
    # integral_{e1}^0 (1 - Phi) = -e1 - (G(0) - G(e1))  for e1 < 0
    en = np.minimum(e1, 0.0)
    neg = neg + np.where(e1 < 0, -en - (_G0 - _G(en)), 0.0)
    return neg, pos


# --------------------------------------------------------------------------------------
# Exact W1 of an empirical sample
# --------------------------------------------------------------------------------------


def standardize_columns(h: np.ndarray, ddof: int = 0) -> np.ndarray:
    """``(h - mean) / std`` per column of ``h [N, K]`` in float64 (population std by default).

    A constant column (std 0) becomes NaN, and so does its score.
    """
    h = np.asarray(h, dtype=np.float64)
    mean = h.mean(axis=0)
    std = h.std(axis=0, ddof=ddof)
    with np.errstate(divide="ignore", invalid="ignore"):
        return (h - mean) / np.where(std > 0, std, np.nan)


def exact_w1_split_columns(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(w1, w1_negative)`` per column of ``z [N, K]`` against N(0, 1).

    ``z`` is used as given (standardize it first, e.g. with :func:`standardize_columns`).
    ``w1_negative`` is the part of the integral over ``z < 0``. Cost: one sort,
    O(N K) closed-form evaluations, no sampling. Columns with NaN give NaN.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[0] == 0:
        raise ValueError(f"expected a non-empty [N, K] array, got shape {z.shape}")
    n = z.shape[0]
    zs = np.sort(z, axis=0)
    bad = np.isnan(zs).any(axis=0)
    zs = np.where(bad, 0.0, zs)  # keep the arithmetic finite; reported as NaN below
    neg, pos = _tails(zs[0], zs[-1])
    if n > 1:
        k = np.arange(1, n, dtype=np.float64)[:, None]
        c = k / n  # F_n on (z_(k), z_(k+1))
        cbar = (n - k) / n  # 1 - F_n there, exact
        a, b = zs[:-1], zs[1:]
        bn = np.minimum(b, 0.0)
        neg = neg + np.where(a < bn, _int_abs_const(c, a, bn), 0.0).sum(axis=0)
        # mirrored positive half: x -> -x, F -> 1 - F
        ap, bp = -b, -np.maximum(a, 0.0)
        pos = pos + np.where(ap < bp, _int_abs_const(cbar, ap, bp), 0.0).sum(axis=0)
    total = np.where(bad, np.nan, neg + pos)
    return total, np.where(bad, np.nan, neg)


def exact_w1_to_std_normal_columns(z: np.ndarray) -> np.ndarray:
    """Exact W1 to N(0, 1) of each column of ``z [N, K]`` (already standardized) -> ``[K]``."""
    return exact_w1_split_columns(z)[0]


def exact_w1_to_std_normal(z: np.ndarray) -> float:
    """Exact W1 between the empirical distribution of ``z`` (weights ``1/N``) and N(0, 1).

    ``z`` should already be standardized; nothing is re-standardized here.
    """
    z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
    return float(exact_w1_split_columns(z)[0][0])


def w1_negative_part_columns(z: np.ndarray) -> np.ndarray:
    """Per column, the part of ``integral |F_n - Phi|`` over the standardized axis ``z < 0``."""
    return exact_w1_split_columns(z)[1]


def w1_negative_part(z: np.ndarray) -> float:
    """The part of the exact W1 integral over ``z < 0`` (standardized axis)."""
    z = np.asarray(z, dtype=np.float64).reshape(-1, 1)
    return float(exact_w1_split_columns(z)[1][0])


# --------------------------------------------------------------------------------------
# Exact W1 of a piecewise-uniform distribution (a histogram)
# --------------------------------------------------------------------------------------


def _bisect_root(fn, lo: np.ndarray, hi: np.ndarray, increasing: bool, iters: int = 64):
    """Root of a monotone ``fn`` on ``[lo, hi]`` that changes sign there (vectorized)."""
    lo = lo.copy()
    hi = hi.copy()
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        below = fn(mid) < 0
        if not increasing:
            below = ~below
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    return 0.5 * (lo + hi)


def _int_abs_linear_neg(a: np.ndarray, b: np.ndarray, fa: np.ndarray, rho: np.ndarray):
    """``integral_a^b |fa + rho (x - a) - Phi(x)| dx`` for pieces with ``a < b <= 0``, ``rho >= 0``.

    On ``x <= 0``, ``D(x) = fa + rho (x - a) - Phi(x)`` is concave (``D'' = x phi(x)``), so its
    non-negative set on ``[a, b]`` is one interval ``[r1, r2]`` around the maximizer ``xm``
    (``phi(xm) = rho``); the roots are found by bisection on the two monotone sides and
    ``integral |D| = -integral_a^b D + 2 integral_{r1}^{r2} D`` in closed form. For ``rho = 0``
    the root is ``Phi^{-1}(fa)``, in closed form.
    """

    def d_at(x, a_, fa_, rho_):
        return fa_ + rho_ * (x - a_) - ndtr(x)

    def integral(p, q, a_, fa_, rho_):
        return fa_ * (q - p) + 0.5 * rho_ * (q - p) * (q + p - 2.0 * a_) - (_G(q) - _G(p))

    with np.errstate(divide="ignore", invalid="ignore"):
        xs = np.where(
            rho >= _INV_SQRT_2PI,
            0.0,
            np.where(rho > 0, -np.sqrt(-2.0 * np.log(rho / _INV_SQRT_2PI)), -np.inf),
        )
    xm = np.minimum(np.maximum(xs, a), b)
    dm = d_at(xm, a, fa, rho)
    out = -integral(a, b, a, fa, rho)
    pos = np.nonzero(dm > 0)[0]
    if pos.size:
        a_, b_, fa_, rho_, xm_ = a[pos], b[pos], fa[pos], rho[pos], xm[pos]
        r1 = a_.copy()
        r2 = b_.copy()
        da = d_at(a_, a_, fa_, rho_)
        db = d_at(b_, a_, fa_, rho_)
        # rising side [a, xm]
        i = np.nonzero(da < 0)[0]
        if i.size:
            ai, fi, ri = a_[i], fa_[i], rho_[i]
            r1[i] = _bisect_root(lambda x: d_at(x, ai, fi, ri), ai, xm_[i], increasing=True)
        # falling side [xm, b]
        j = np.nonzero(db < 0)[0]
        if j.size:
            flat = rho_[j] == 0
            root = np.empty(j.size)
            jf, js = j[flat], j[~flat]
            if jf.size:  # constant F: closed-form root
                root[flat] = np.minimum(np.maximum(ndtri(fa_[jf]), xm_[jf]), b_[jf])
            if js.size:
                aj, fj, rj = a_[js], fa_[js], rho_[js]
                root[~flat] = _bisect_root(
                    lambda x: d_at(x, aj, fj, rj), xm_[js], b_[js], increasing=False
                )
            r2[j] = root
        out[pos] += 2.0 * integral(r1, r2, a_, fa_, rho_)
    return out


def w1_histogram_to_std_normal(
    edges: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact ``(w1, w1_negative)`` between a piecewise-uniform distribution and N(0, 1).

    ``edges [K, M+1]`` (non-decreasing, on the standardized axis) and ``counts [K, M]``
    describe, per row, mass ``counts[j] / sum(counts)`` spread uniformly over
    ``[edges[j], edges[j+1]]`` (a zero-width bin is a point mass). The CDF is then
    piecewise linear and the integral ``|F - Phi|`` is evaluated exactly (up to float64
    root finding) by :func:`_int_abs_linear_neg` on each piece, mirrored to ``x <= 0``.
    """
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if edges.ndim == 1:
        edges, counts = edges[None], counts[None]
    k, m = counts.shape
    if edges.shape != (k, m + 1):
        raise ValueError(f"edges {edges.shape} do not match counts {counts.shape}")
    total = counts.sum(axis=1, keepdims=True)
    cum = np.concatenate([np.zeros((k, 1)), np.cumsum(counts, axis=1)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_edge = cum / total  # F at the edges
        s_edge = (total - cum) / total  # 1 - F at the edges, without cancellation
        width = np.diff(edges, axis=1)
        rho = np.where(width > 0, (counts / total) / width, 0.0)
    lo, hi = edges[:, :-1], edges[:, 1:]
    row = np.broadcast_to(np.arange(k)[:, None], (k, m))

    neg, pos = _tails(edges[:, 0], edges[:, -1])

    # pieces on the negative half
    bn = np.minimum(hi, 0.0)
    sel = lo < bn
    vals = _int_abs_linear_neg(lo[sel], bn[sel], f_edge[:, :-1][sel], rho[sel])
    neg = neg + np.bincount(row[sel], weights=vals, minlength=k)

    # pieces on the positive half, mirrored: [a, b] -> [-b, -a], F -> 1 - F
    ap, bp = -hi, -np.maximum(lo, 0.0)
    sel = ap < bp
    vals = _int_abs_linear_neg(ap[sel], bp[sel], s_edge[:, 1:][sel], rho[sel])
    pos = pos + np.bincount(row[sel], weights=vals, minlength=k)

    bad = ~np.isfinite(edges).all(axis=1) | ~(total[:, 0] > 0)
    return np.where(bad, np.nan, neg + pos), np.where(bad, np.nan, neg)


# --------------------------------------------------------------------------------------
# The part of W1 below a split point (e.g. h < 0: z < -mean/std)
# --------------------------------------------------------------------------------------


def _tails_between(e0: np.ndarray, e1: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The two tails' part on ``[u, v]`` (``u <= v``): ``Phi`` where ``x < e0`` plus
    ``1 - Phi`` where ``x > e1``; ``u = -inf`` and ``v = +inf`` allowed."""
    lo_t, hi_t = np.minimum(e0, -40.0), np.maximum(e1, 40.0)  # Phi(-40) is 0 in float64
    u, v = np.clip(u, lo_t, hi_t), np.clip(v, lo_t, hi_t)
    left = _G(np.minimum(v, e0)) - _G(np.minimum(u, e0))
    right = _G(-np.maximum(u, e1)) - _G(-np.maximum(v, e1))  # integral_x^inf (1 - Phi) = G(-x)
    return left + right


def exact_w1_below_columns(z: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per column of ``z [N, K]``: the part of the exact W1 integral over ``x < split[k]``
    and the fraction of the sample below ``split[k]``.

    With ``split = -mean/std`` these are the W1 part at negative raw pre-activations and
    the share of tokens with ``h < 0``. ``split = 0`` gives ``w1_negative``; ``+inf`` the
    whole W1. Pieces below 0 are integrated as in :func:`exact_w1_split_columns`; those in
    ``[0, split)`` mirrored the same way. Columns with NaN give NaN.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim == 1:
        z = z[:, None]
    n, k = z.shape
    split = np.broadcast_to(np.asarray(split, dtype=np.float64), (k,))
    zs = np.sort(z, axis=0)
    bad = np.isnan(zs).any(axis=0) | np.isnan(split)
    zs = np.where(bad, 0.0, zs)
    s = np.where(bad, 0.0, split)
    fin = np.clip(s, zs[0] - 1.0, zs[-1] + 1.0)  # beyond the sample only the tails move
    out = _tails_between(zs[0], zs[-1], np.full(k, -np.inf), s)
    if n > 1:
        c = (np.arange(1, n, dtype=np.float64) / n)[:, None]
        cbar = 1.0 - c
        a, b = zs[:-1], zs[1:]
        bn = np.minimum(b, np.minimum(fin, 0.0))
        out = out + np.where(a < bn, _int_abs_const(c, a, bn), 0.0).sum(axis=0)
        # [0, split): mirrored, x -> -x, F -> 1 - F
        ap, bp = -np.minimum(b, fin), -np.maximum(a, 0.0)
        out = out + np.where(ap < bp, _int_abs_const(cbar, ap, bp), 0.0).sum(axis=0)
    frac = (z < split).mean(axis=0)
    return np.where(bad, np.nan, out), np.where(bad, np.nan, frac)


def w1_histogram_below(edges: np.ndarray, counts: np.ndarray, split: np.ndarray,
                       w1_negative: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the part of :func:`w1_histogram_to_std_normal`'s integral over
    ``x < split[k]`` and the mass below ``split[k]`` (the distribution's CDF there).

    Computed as ``w1_negative`` (pass it when known) plus the part on ``[0, split)``, or
    minus the part on ``[split, 0)``: only the pieces between 0 and the split are
    integrated again. A piece that straddles a bound is cut there (its density is
    uniform, so the cut is exact).
    """
    edges = np.asarray(edges, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    if edges.ndim == 1:
        edges, counts = edges[None], counts[None]
    k, m = counts.shape
    split = np.broadcast_to(np.asarray(split, dtype=np.float64), (k,))
    if w1_negative is None:
        w1_negative = w1_histogram_to_std_normal(edges, counts)[1]
    total = counts.sum(axis=1, keepdims=True)
    cum = np.concatenate([np.zeros((k, 1)), np.cumsum(counts, axis=1)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        f_edge = cum / total
        s_edge = (total - cum) / total
        width = np.diff(edges, axis=1)
        rho = np.where(width > 0, (counts / total) / width, 0.0)
    bad = ~np.isfinite(edges).all(axis=1) | ~(total[:, 0] > 0) | np.isnan(split)
    edges = np.where(bad[:, None], 0.0, edges)
    f_edge, s_edge, rho = (np.where(bad[:, None], 0.0, x) for x in (f_edge, s_edge, rho))
    s = np.where(bad, 0.0, split)
    lo, hi = edges[:, :-1], edges[:, 1:]
    sc = np.clip(s, edges[:, 0] - 1.0, edges[:, -1] + 1.0)[:, None]  # beyond: only tails move
    row = np.broadcast_to(np.arange(k)[:, None], (k, m))
    pos_side = s >= 0
    # [0, split) for split >= 0: mirrored (x -> -x, F -> 1 - F); 1 - F at the cut end
    # min(hi, split) is s_edge[hi] + rho (hi - cut)
    cut = np.minimum(hi, sc)
    ap, bp = -cut, -np.maximum(lo, 0.0)
    sel = (ap < bp) & pos_side[:, None]
    vals = _int_abs_linear_neg(ap[sel], bp[sel], (s_edge[:, 1:] + rho * (hi - cut))[sel], rho[sel])
    add = np.bincount(row[sel], weights=vals, minlength=k)
    # [split, 0) for split < 0: as w1_negative's pieces, F at the cut start max(lo, split)
    start = np.maximum(lo, sc)
    bn = np.minimum(hi, 0.0)
    sel = (start < bn) & ~pos_side[:, None]
    vals = _int_abs_linear_neg(start[sel], bn[sel], (f_edge[:, :-1] + rho * (start - lo))[sel], rho[sel])
    sub = np.bincount(row[sel], weights=vals, minlength=k)
    e0, e1 = edges[:, 0], edges[:, -1]
    tails = _tails_between(e0, e1, np.minimum(s, 0.0), np.maximum(s, 0.0))
    out = np.where(pos_side, w1_negative + add + tails, w1_negative - sub - tails)

    # mass below the split: whole bins below it, plus the cut bin's share
    inside = np.clip(np.minimum(hi, sc) - lo, 0.0, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(width > 0, np.minimum(inside / width, 1.0), (hi <= sc).astype(np.float64))
    mass = (counts * share).sum(axis=1) / total[:, 0]
    return np.where(bad, np.nan, out), np.where(bad, np.nan, mass)


# --------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------


def top_percent_mask(scores: np.ndarray, percent: float) -> np.ndarray:
    """Neurons whose score is strictly above the layer's ``(100 - percent)``-th percentile.

    Same rule as the reference code, ``scores > np.percentile(scores, 100 - percent)``
    (numpy's default linear interpolation). Ties: a score *equal* to the threshold is not
    selected, so tied neurons at the boundary are all left out together (with all scores
    equal, nothing is selected; ``percent = 0`` selects nothing; ``percent = 100`` selects
    all but the minimum value(s)). With ``K`` distinct scores exactly
    ``K - 1 - floor((1 - percent / 100) * (K - 1))`` neurons are selected (111 of 11,008
    at 1%). NaN scores (e.g. constant
    neurons) are left out of the percentile and never selected; without NaNs the result
    equals the reference expression exactly.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not 0.0 <= float(percent) <= 100.0:
        raise ValueError(f"percent must be in [0, 100], got {percent}")
    ok = ~np.isnan(s)
    if not ok.any():
        return np.zeros(s.shape, dtype=bool)
    threshold = np.percentile(s[ok], 100.0 - float(percent))
    return ok & (s > threshold)
