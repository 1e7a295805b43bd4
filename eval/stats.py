"""Accuracy tables, paired statistics and the bootstrap / standard-error helpers of the evaluations.

Only numpy, scipy and pydantic; no torch, no vllm.

Besides the minimal-pair tables below, the analyses take their interval and error
estimates from here: :func:`bootstrap_mean_ci` (percentile bootstrap CI of a mean,
e.g. the POS analysis's excess surprisal per tag), :func:`paired_diff_stderr` and
:func:`unpaired_diff_stderr` (standard errors of a difference of means, e.g. the
lm_eval task deltas).

A *record* is the result for one pair in one run: anything with the attributes
(or mapping keys) ``source``, ``paradigm``, ``pair_id``, ``phenomenon`` and a
boolean correctness field (``correct`` by default; pass ``correct_field`` to use
another, e.g. ``correct_sum`` for TSE's summed-log-probability variant).
:class:`PairRecord` is a ready-made model for it.

Grouping: rows are labelled by the group value (e.g. the paradigm name); when
the records come from more than one source (``blimp``, ``tse``, ``tse-ml``) the
label is ``"<source>:<value>"`` so that, say, ``tse`` and ``tse-ml`` tests with the
same name are never pooled. The ``overall`` row pools every pair.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import stats as _sps

__all__ = [
    "AccuracyRow",
    "AccuracyTable",
    "ComparisonRow",
    "PairRecord",
    "RunMismatchError",
    "accuracy_table",
    "bootstrap_mean_ci",
    "compare_runs",
    "format_p",
    "mcnemar",
    "minimal_detectable_effect",
    "paired_bootstrap_ci",
    "paired_diff_stderr",
    "pooled_paired_difference",
    "unpaired_diff_stderr",
]

OVERALL = "overall"
MCNEMAR_EXACT_BELOW = 25


class RunMismatchError(ValueError):
    """Two runs to be compared do not cover the same pairs (or disagree on their groups)."""


class PairRecord(BaseModel):
    """The result for one minimal pair in one run."""

    model_config = ConfigDict(extra="allow")

    source: str
    paradigm: str
    pair_id: int
    phenomenon: str
    correct: bool


class AccuracyRow(BaseModel):
    level: str  # "paradigm", "phenomenon", ... or "overall"
    group: str
    n: int
    n_correct: int
    accuracy: float


class AccuracyTable(BaseModel):
    rows: list[AccuracyRow]

    def level(self, level: str) -> dict[str, AccuracyRow]:
        """The rows of one level, keyed by group label."""
        return {r.group: r for r in self.rows if r.level == level}

    @property
    def overall(self) -> AccuracyRow:
        return next(r for r in self.rows if r.level == OVERALL)


class ComparisonRow(BaseModel):
    """Run B against run A on the same pairs; ``delta = acc_b - acc_a``.

    ``b01``: pairs A got wrong and B got right; ``b10``: A right, B wrong.
    """

    level: str
    group: str
    n: int
    acc_a: float
    acc_b: float
    delta: float
    ci_lo: float
    ci_hi: float
    b01: int
    b10: int
    p_value: float
    # smallest |delta| this many pairs would detect (alpha 0.05 two-sided, power 0.8) at
    # this comparison's rate of discordant pairs: see minimal_detectable_effect
    mde: float = float("nan")


# --------------------------------------------------------------------------- helpers


def _get(rec: Any, name: str, i: int) -> Any:
    if isinstance(rec, Mapping):
        if name in rec:
            return rec[name]
    elif hasattr(rec, name):
        return getattr(rec, name)
    raise ValueError(f"record {i} has no field {name!r}: {rec!r}")


def _as_bool(v: Any, name: str, i: int) -> bool:
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)) and v in (0, 1):
        return bool(v)
    raise ValueError(f"record {i}: field {name!r} must be a boolean, got {v!r}")


def _as_bool_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if arr.dtype != bool:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (or 0/1)")
        arr = arr.astype(bool)
    return arr


class _Table:
    """Records flattened into columns."""

    def __init__(
        self, records: Iterable[Any], group_keys: Sequence[str], correct_field: str
    ) -> None:
        self.keys: list[tuple[str, str, int]] = []
        self.groups: dict[str, list[str]] = {k: [] for k in group_keys}
        correct: list[bool] = []
        for i, r in enumerate(records):
            src = str(_get(r, "source", i))
            self.keys.append((src, str(_get(r, "paradigm", i)), int(_get(r, "pair_id", i))))
            for k in group_keys:
                self.groups[k].append(str(_get(r, k, i)))
            correct.append(_as_bool(_get(r, correct_field, i), correct_field, i))
        self.correct = np.asarray(correct, dtype=bool)
        self.multi_source = len({k[0] for k in self.keys}) > 1

    def labels(self, group_key: str) -> list[str]:
        vals = self.groups[group_key]
        if not self.multi_source:
            return vals
        return [f"{k[0]}:{v}" for k, v in zip(self.keys, vals, strict=True)]


def _index_groups(labels: Sequence[str]) -> dict[str, np.ndarray]:
    idx: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(labels):
        idx[g].append(i)
    return {g: np.asarray(idx[g], dtype=np.int64) for g in sorted(idx)}


def _acc_row(level: str, group: str, correct: np.ndarray) -> AccuracyRow:
    n = int(correct.size)
    k = int(correct.sum())
    return AccuracyRow(level=level, group=group, n=n, n_correct=k, accuracy=k / n if n else float("nan"))


# --------------------------------------------------------------------------- accuracy


def accuracy_table(
    data: Mapping[str, Sequence[bool]] | Iterable[Any],
    *,
    group_keys: Sequence[str] = ("paradigm", "phenomenon"),
    phenomenon_of: Mapping[str, str] | None = None,
    correct_field: str = "correct",
) -> AccuracyTable:
    """Accuracy per group and overall, pooled over pairs (not averaged over groups).

    ``data`` is either a mapping ``paradigm -> [correct, ...]`` (then
    ``phenomenon_of`` maps paradigms to phenomena for the pooled phenomenon rows,
    and ``group_keys`` is ignored) or an iterable of records, grouped by each of
    ``group_keys`` in turn. Groups within a level are sorted by label; the
    ``overall`` row comes last.
    """
    rows: list[AccuracyRow] = []
    if isinstance(data, Mapping):
        arrays = {str(k): _as_bool_array(v, f"data[{k!r}]") for k, v in data.items()}
        for g in sorted(arrays):
            rows.append(_acc_row("paradigm", g, arrays[g]))
        if phenomenon_of is not None:
            missing = sorted(set(arrays) - set(phenomenon_of))
            if missing:
                raise ValueError(f"phenomenon_of has no entry for: {', '.join(missing)}")
            pooled: dict[str, list[np.ndarray]] = defaultdict(list)
            for g, arr in arrays.items():
                pooled[str(phenomenon_of[g])].append(arr)
            for ph in sorted(pooled):
                rows.append(_acc_row("phenomenon", ph, np.concatenate(pooled[ph])))
        allc = np.concatenate(list(arrays.values())) if arrays else np.zeros(0, dtype=bool)
        rows.append(_acc_row(OVERALL, OVERALL, allc))
        return AccuracyTable(rows=rows)

    tab = _Table(data, group_keys, correct_field)
    for gk in group_keys:
        for g, idx in _index_groups(tab.labels(gk)).items():
            rows.append(_acc_row(gk, g, tab.correct[idx]))
    rows.append(_acc_row(OVERALL, OVERALL, tab.correct))
    return AccuracyTable(rows=rows)


# --------------------------------------------------------------------------- bootstrap


def _resampled_means(
    x: np.ndarray, n_boot: int, rng: np.random.Generator, chunk_elems: int
) -> np.ndarray:
    """``n_boot`` bootstrap means of ``x`` (non-empty): each replicate draws ``n``
    indices uniformly from ``0..n-1`` (with replacement) and averages ``x`` there.

    Drawn in chunks of about ``chunk_elems`` indices (``rng.integers(0, n, (m, n))``)
    to bound memory; the draws, and so the replicates, are those of the plain loop
    ``for _ in range(n_boot): reps.append(x[rng.integers(0, n, n)].mean())`` whatever
    the chunk size. Integer ``x`` is summed in int64 (exact), floats in float64.
    """
    n = x.size
    acc = np.int64 if np.issubdtype(x.dtype, np.integer) else np.float64
    rows = max(1, int(chunk_elems) // n)
    reps = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        idx = rng.integers(0, n, size=(m, n))
        reps[start : start + m] = x[idx].sum(axis=1, dtype=acc) / n
    return reps


def bootstrap_mean_ci(
    values: Any,
    n_boot: int,
    alpha: float,
    seed: int | Sequence[int],
    chunk_elems: int = 1 << 22,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of ``values`` (one sample, not paired).

    With ``x_1..x_n`` the values, replicate ``r`` resamples ``n`` of them with
    replacement and takes ``m_r = (1/n) * sum_j x_{I_rj}``, ``I_rj ~ U{1..n}``; the
    interval is ``(q_{alpha/2}, q_{1-alpha/2})`` of ``m_1..m_{n_boot}`` (numpy's
    default linear interpolation). Indices come from
    ``numpy.random.default_rng(seed)`` (``seed`` an int or a sequence of ints, the
    latter passed as a list) in the order of the plain loop
    ``for _ in range(n_boot): reps.append(x[rng.integers(0, n, n)].mean())``, drawn
    in chunks of about ``chunk_elems`` indices (the chunk size changes memory, not
    the result).

    Returns ``(nan, nan)`` when ``values`` is empty or ``n_boot < 1``, and ``(v, v)``
    for a single value ``v``. (For a paired difference of two 0/1 correctness
    vectors use :func:`paired_bootstrap_ci`, which also returns the observed delta.)
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    if n == 0 or n_boot < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(
        int(seed) if isinstance(seed, (int, np.integer)) else list(seed)
    )
    reps = _resampled_means(x.ravel(), n_boot, rng, chunk_elems)
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def paired_bootstrap_ci(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    method: Literal["multinomial", "index"] = "multinomial",
    chunk_elems: int = 1 << 22,
) -> tuple[float, float, float]:
    """Paired percentile bootstrap for ``acc(B) - acc(A)`` on the same pairs.

    Each replicate resamples the *pairs* (with replacement, ``n`` of ``n``) and
    takes the mean of ``d = b - a``, per pair in ``{-1, 0, +1}``. Returns
    ``(delta, lo, hi)``: the observed difference and the ``alpha/2`` and
    ``1 - alpha/2`` quantiles (numpy's default linear interpolation) of the
    replicates.

    ``method="multinomial"`` (default) draws the replicate's counts of
    ``d = -1, 0, +1`` directly from Multinomial(n, observed proportions). As the
    resampled mean depends on the resample only through these counts, this is
    the same bootstrap distribution as resampling indices, exactly, at O(n_boot)
    cost whatever ``n``. ``method="index"`` resamples indices explicitly, in
    chunks of about ``chunk_elems`` draws to bound memory; with the same seed it
    reproduces, draw for draw, the loop
    ``for _ in range(n_boot): idx = rng.integers(0, n, n); reps.append(d[idx].mean())``
    with ``rng = np.random.default_rng(seed)``.
    """
    a = _as_bool_array(a_correct, "a_correct")
    b = _as_bool_array(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"a_correct and b_correct differ in length: {a.size} vs {b.size}")
    n = a.size
    if n == 0:
        raise ValueError("no pairs to bootstrap")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    d = b.astype(np.int8) - a.astype(np.int8)
    delta = float(d.sum(dtype=np.int64)) / n
    rng = np.random.default_rng(seed)
    if method == "multinomial":
        n_neg = int((d < 0).sum())
        n_pos = int((d > 0).sum())
        pvals = np.array([n_neg, n - n_neg - n_pos, n_pos], dtype=np.float64) / n
        counts = rng.multinomial(n, pvals, size=n_boot)
        reps = (counts[:, 2] - counts[:, 0]) / n
    elif method == "index":
        reps = _resampled_means(d, n_boot, rng, chunk_elems)
    else:
        raise ValueError(f"unknown method {method!r} (use 'multinomial' or 'index')")
    lo, hi = np.quantile(reps, [alpha / 2.0, 1.0 - alpha / 2.0])
    return delta, float(lo), float(hi)


# --------------------------------------------------------------------------- standard errors


def paired_diff_stderr(a: Sequence[float], b: Sequence[float]) -> float:
    """Standard error of ``mean(a) - mean(b)`` when ``a[i]`` and ``b[i]`` are scores of
    the *same* item ``i`` (paired):

    ``d_i = a_i - b_i``, ``dbar = (1/n) sum d_i``,
    ``SE = sqrt( sum (d_i - dbar)^2 / (n - 1) / n )`` = ``std(d, ddof=1) / sqrt(n)``.

    It accounts for the correlation between the two sets of scores, so it is
    (much) smaller than :func:`unpaired_diff_stderr` when the two conditions agree
    on most items. Sums use :func:`math.fsum` (exactly rounded). Needs ``n >= 2``
    items and equal lengths (else ``ValueError``).
    """
    if len(a) != len(b):
        raise ValueError(f"a and b differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n < 2:
        raise ValueError(f"a paired standard error needs at least 2 items, got {n}")
    d = [x - y for x, y in zip(a, b, strict=True)]
    mean = math.fsum(d) / n
    var = math.fsum((x - mean) ** 2 for x in d) / (n - 1)
    return math.sqrt(var / n)


def unpaired_diff_stderr(se_a: float, se_b: float) -> float:
    """Standard error of ``mean(a) - mean(b)`` from the two means' own standard errors,
    treating them as independent: ``SE = sqrt(se_a^2 + se_b^2)`` (``math.hypot``).

    On the same items this ignores the (usually positive) correlation between the
    two conditions and so overstates the uncertainty; prefer
    :func:`paired_diff_stderr` when per-item scores exist.
    """
    return math.hypot(se_a, se_b)


# --------------------------------------------------------------------------- McNemar


def format_p(p: float) -> str:
    """A p-value to 2 significant digits for tables; one that underflowed float64 says
    so ("< 1e-300") instead of printing 0, which no test statistic means."""
    return "< 1e-300" if p == 0 else f"{p:.2g}"


def minimal_detectable_effect(n: int, discordant_rate: float, *, alpha: float = 0.05,
                              power: float = 0.8) -> float:
    """The smallest accuracy difference (as a fraction) a paired comparison of ``n`` pairs
    detects with probability ``power`` at two-sided level ``alpha``, when a share
    ``discordant_rate`` of the pairs changes its decision between the two runs.

    For a small difference the paired accuracy difference has standard error
    ``sqrt(discordant_rate / n)`` (McNemar's normal approximation), so the MDE is
    ``(z_{1-alpha/2} + z_{power}) * sqrt(discordant_rate / n)``, ~2.8 sqrt(d / n) at the
    defaults. Why it matters: with 1,005 BLiMP pairs and 5% discordant pairs it is ~2.0
    points, so a 1-point effect cannot show; 67,000 pairs bring it to ~0.24. NaN for
    ``n == 0``; 0 when no pair is discordant (then any change would show).
    """
    if n <= 0:
        return float("nan")
    if not 0.0 <= discordant_rate <= 1.0:
        raise ValueError(f"discordant_rate must be in [0, 1], got {discordant_rate}")
    z = _sps.norm.ppf(1.0 - alpha / 2.0) + _sps.norm.ppf(power)
    return float(z * math.sqrt(discordant_rate / n))


def mcnemar(
    a_correct: np.ndarray,
    b_correct: np.ndarray,
    *,
    exact: bool | None = None,
    exact_below: int = MCNEMAR_EXACT_BELOW,
) -> tuple[int, int, float]:
    """McNemar's test of equal accuracy for two systems on the same pairs.

    Returns ``(b01, b10, p_value)`` with ``b01`` = pairs A got wrong and B right,
    ``b10`` = A right and B wrong. Only the discordant pairs matter: under the null
    ``b01 ~ Binomial(b01 + b10, 1/2)``.

    - ``exact=None`` (default): the exact two-sided binomial test
      (``scipy.stats.binomtest``) when ``b01 + b10 < exact_below`` (25), where
      the chi-square approximation is poor; otherwise the chi-square statistic
      with Edwards' continuity correction ``(|b01 - b10| - 1)^2 / (b01 + b10)``
      on 1 degree of freedom (the correction is floored at 0, so equal counts give
      p = 1). ``exact=True``/``False`` forces one or the other.
    - No discordant pairs: p = 1.0.
    """
    a = _as_bool_array(a_correct, "a_correct")
    b = _as_bool_array(b_correct, "b_correct")
    if a.shape != b.shape:
        raise ValueError(f"a_correct and b_correct differ in length: {a.size} vs {b.size}")
    b01 = int((~a & b).sum())
    b10 = int((a & ~b).sum())
    nd = b01 + b10
    if nd == 0:
        return b01, b10, 1.0
    use_exact = nd < exact_below if exact is None else exact
    if use_exact:
        p = _sps.binomtest(b01, nd, 0.5, alternative="two-sided").pvalue
    else:
        stat = max(abs(b01 - b10) - 1, 0) ** 2 / nd
        p = _sps.chi2.sf(stat, df=1)
    return b01, b10, float(min(1.0, p))


# --------------------------------------------------------------------------- comparison


def _keyed(tab: _Table, which: str) -> dict[tuple[str, str, int], int]:
    pos: dict[tuple[str, str, int], int] = {}
    for i, k in enumerate(tab.keys):
        if k in pos:
            raise RunMismatchError(f"run {which} has pair {k} more than once")
        pos[k] = i
    return pos


def compare_runs(
    records_a: Iterable[Any],
    records_b: Iterable[Any],
    group_keys: Sequence[str] = ("paradigm", "phenomenon"),
    *,
    correct_field: str = "correct",
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[ComparisonRow]:
    """Compare run B with run A pair by pair: one row per group of each of
    ``group_keys`` (sorted by label within a level), then an ``overall`` row.

    Pairs are matched on ``(source, paradigm, pair_id)``; the two runs must hold
    exactly the same pairs (else :class:`RunMismatchError`, with examples), and
    agree on each pair's group values. Each row's CI is
    :func:`paired_bootstrap_ci` (same ``seed`` for every row) and its p-value
    :func:`mcnemar`. p-values are not corrected for multiple comparisons.
    """
    ta = _Table(records_a, group_keys, correct_field)
    tb = _Table(records_b, group_keys, correct_field)
    pa, pb = _keyed(ta, "A"), _keyed(tb, "B")
    if pa.keys() != pb.keys():
        only_a = sorted(pa.keys() - pb.keys())
        only_b = sorted(pb.keys() - pa.keys())
        raise RunMismatchError(
            f"the runs cover different pairs: A has {len(pa)}, B has {len(pb)}; "
            f"{len(only_a)} only in A (e.g. {only_a[:5]}), "
            f"{len(only_b)} only in B (e.g. {only_b[:5]})"
        )
    keys = sorted(pa)
    ia = np.fromiter((pa[k] for k in keys), dtype=np.int64, count=len(keys))
    ib = np.fromiter((pb[k] for k in keys), dtype=np.int64, count=len(keys))
    ca, cb = ta.correct[ia], tb.correct[ib]

    def row(level: str, group: str, sel: np.ndarray | slice) -> ComparisonRow:
        a, b = ca[sel], cb[sel]
        delta, lo, hi = paired_bootstrap_ci(a, b, n_boot=n_boot, alpha=alpha, seed=seed)
        b01, b10, p = mcnemar(a, b)
        return ComparisonRow(
            level=level, group=group, n=int(a.size), acc_a=float(a.mean()),
            acc_b=float(b.mean()), delta=delta, ci_lo=lo, ci_hi=hi, b01=b01, b10=b10,
            p_value=p, mde=minimal_detectable_effect(int(a.size), (b01 + b10) / max(1, a.size)),
        )

    rows: list[ComparisonRow] = []
    for gk in group_keys:
        la, lb = ta.labels(gk), tb.labels(gk)
        labels = [la[i] for i in ia]
        for k, i, j in zip(keys, ia, ib, strict=True):
            if la[i] != lb[j]:
                raise RunMismatchError(
                    f"pair {k}: {gk} is {ta.groups[gk][i]!r} in run A but "
                    f"{tb.groups[gk][j]!r} in run B"
                )
        for g, idx in _index_groups(labels).items():
            rows.append(row(gk, g, idx))
    if keys:
        rows.append(row(OVERALL, OVERALL, slice(None)))
    return rows


def pooled_paired_difference(
    records_a: Iterable[Any],
    records_draws: Sequence[Iterable[Any]],
    group_keys: Sequence[str] = (),
    *,
    correct_field: str = "correct",
    n_boot: int = 10000,
    alpha: float = 0.05,
    seed: int = 0,
) -> list[ComparisonRow]:
    """Run A against several runs of one kind of control at once (the draws of a random
    control), pair by pair: per pair ``d = a - mean_k(b_k)``, in ``{-1, ..., +1}`` in steps
    of ``1/K``; ``delta`` = mean ``d`` (note: A minus the draws, unlike
    :func:`compare_runs`' B minus A), its CI the percentile bootstrap over pairs
    (:func:`bootstrap_mean_ci`, ``seed``). ``acc_a`` is A's accuracy, ``acc_b`` the draws'
    mean accuracy; ``b01``/``b10`` count the pairs where A is right less / more often than
    the draws on average; ``p_value`` is the one-sample t-test of ``d`` (McNemar needs two
    runs); ``mde`` the smallest delta detected at power 0.8, ``2.8 sd(d) / sqrt(n)`` (with
    one draw, ``sd(d)^2`` is the discordant rate less ``delta^2``: the paired MDE). One row
    per group of each of ``group_keys`` (sorted by label within a level), then ``overall``,
    as in :func:`compare_runs`.

    Why: each draw compared alone is as noisy as one run; averaging the draws' correctness
    per pair removes most of the control's pair-level noise from the difference, so the CI
    narrows toward A's own noise. The CI holds the draws fixed (it says how well these
    pairs pin the difference from *these* draws, not how another draw would land: the spread
    of the per-draw differences says that).

    The runs must cover the same pairs (matched on ``(source, paradigm, pair_id)``; else
    :class:`RunMismatchError`), and there must be at least one draw.
    """
    if not records_draws:
        raise ValueError("no draws to pool")
    ta = _Table(records_a, group_keys, correct_field)
    pa = _keyed(ta, "A")
    keys = sorted(pa)
    ia = np.fromiter((pa[k] for k in keys), dtype=np.int64, count=len(keys))
    a = ta.correct[ia]
    draws = []
    for i, recs in enumerate(records_draws):
        tb = _Table(recs, (), correct_field)
        pb = _keyed(tb, f"draw {i}")
        if pb.keys() != pa.keys():
            raise RunMismatchError(f"draw {i} covers other pairs than run A: {len(pb)} vs {len(pa)} pairs, "
                                   f"{len(pb.keys() ^ pa.keys())} differ")
        draws.append(tb.correct[np.fromiter((pb[k] for k in keys), dtype=np.int64, count=len(keys))])
    if not keys:
        raise ValueError("no pairs to compare")
    b = np.mean(np.stack(draws).astype(np.float64), axis=0)
    d = a.astype(np.float64) - b
    z = _sps.norm.ppf(1.0 - alpha / 2.0) + _sps.norm.ppf(0.8)

    def row(level: str, group: str, sel: np.ndarray | slice) -> ComparisonRow:
        dd = d[sel]
        lo, hi = bootstrap_mean_ci(dd, n_boot, alpha, seed)
        if np.all(dd == dd[0]):  # no spread: the t statistic is undefined
            p = 1.0 if dd[0] == 0 else 0.0
        else:
            p = float(_sps.ttest_1samp(dd, 0.0).pvalue)
        sd = float(dd.std(ddof=1)) if dd.size > 1 else 0.0
        return ComparisonRow(
            level=level, group=group, n=int(dd.size), acc_a=float(a[sel].mean()), acc_b=float(b[sel].mean()),
            delta=float(dd.mean()), ci_lo=lo, ci_hi=hi, b01=int((dd < 0).sum()), b10=int((dd > 0).sum()),
            p_value=p, mde=float(z * sd / math.sqrt(dd.size)),
        )

    rows = []
    for gk in group_keys:
        labels = ta.labels(gk)
        for g, idx in _index_groups([labels[i] for i in ia]).items():
            rows.append(row(gk, g, idx))
    rows.append(row(OVERALL, OVERALL, slice(None)))
    return rows
