"""Tests for eval.stats: accuracy tables, paired bootstrap, McNemar, run comparison."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from eval.stats import (
    PairRecord,
    RunMismatchError,
    accuracy_table,
    bootstrap_mean_ci,
    compare_runs,
    mcnemar,
    paired_bootstrap_ci,
    paired_diff_stderr,
    pooled_paired_difference,
    unpaired_diff_stderr,
)


def _pairs(n_both: int, n_neither: int, n_b_only: int, n_a_only: int) -> tuple[np.ndarray, np.ndarray]:
    """a/b correctness with the given 2x2 cell counts, in a fixed interleaved order."""
    a = [True] * n_both + [False] * n_neither + [False] * n_b_only + [True] * n_a_only
    b = [True] * n_both + [False] * n_neither + [True] * n_b_only + [False] * n_a_only
    perm = np.random.default_rng(123).permutation(len(a))
    return np.asarray(a)[perm], np.asarray(b)[perm]


# --------------------------------------------------------------------------- McNemar


def _binom_two_sided(k: int, n: int) -> float:
    """Hand formula: p = min(1, 2 * P(X <= min(k, n-k))), X ~ Bin(n, 1/2)."""
    m = min(k, n - k)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(m + 1)) / 2**n)


@pytest.mark.parametrize(
    ("b01", "b10", "expected"),
    [
        (3, 0, 0.25),  # 2 * 1/8
        (1, 5, 14 / 64),  # 2 * (1 + 6) / 64
        (2, 8, 112 / 1024),  # 2 * (1 + 10 + 45) / 1024
        (4, 4, 1.0),
        (0, 1, 1.0),
        (17, 7, None),  # 24 discordant: still exact
    ],
)
def test_mcnemar_exact(b01, b10, expected):
    a, b = _pairs(50, 30, b01, b10)
    got = mcnemar(a, b)
    ref = _binom_two_sided(b01, b01 + b10)
    if expected is not None:
        assert ref == pytest.approx(expected, abs=1e-15)
    assert got[:2] == (b01, b10)
    assert got[2] == pytest.approx(ref, rel=1e-12)


def test_mcnemar_chi_square_with_continuity_correction():
    a, b = _pairs(100, 20, 30, 10)
    b01, b10, p = mcnemar(a, b)
    assert (b01, b10) == (30, 10)
    stat = (abs(30 - 10) - 1) ** 2 / 40  # 9.025
    assert p == pytest.approx(math.erfc(math.sqrt(stat / 2)), rel=1e-12)  # chi2(1) survival
    assert p == pytest.approx(0.0026633, rel=1e-4)
    # 25 discordant is the first count that uses chi-square; exact=True forces binomial
    a, b = _pairs(0, 0, 18, 7)
    assert mcnemar(a, b)[2] == pytest.approx(math.erfc(math.sqrt((11 - 1) ** 2 / 25 / 2)))
    assert mcnemar(a, b, exact=True)[2] == pytest.approx(_binom_two_sided(18, 25), rel=1e-12)
    # balanced discordance: continuity correction floored at zero
    a, b = _pairs(5, 5, 20, 20)
    assert mcnemar(a, b)[2] == 1.0


def test_mcnemar_no_discordant_pairs_and_validation():
    a, b = _pairs(10, 5, 0, 0)
    assert mcnemar(a, b) == (0, 0, 1.0)
    assert mcnemar(np.array([1, 0, 1]), np.array([1, 1, 1])) == (1, 0, 1.0)
    with pytest.raises(ValueError, match="differ in length"):
        mcnemar(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match="booleans"):
        mcnemar(np.array([0.5, 1.0]), np.array([1, 1]))


# --------------------------------------------------------------------------- bootstrap


def _slow_bootstrap(a, b, n_boot, alpha, seed):
    rng = np.random.default_rng(seed)
    d = b.astype(int) - a.astype(int)
    reps = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(d), size=len(d))
        reps.append(sum(d[i] for i in idx) / len(d))
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return d.mean(), lo, hi


def test_bootstrap_index_matches_slow_loop_exactly():
    a, b = _pairs(20, 6, 8, 3)  # n = 37 (odd on purpose)
    ref = _slow_bootstrap(a, b, n_boot=300, alpha=0.1, seed=5)
    for chunk in (1, 37 * 7, 1 << 22):  # one replicate per chunk, 7 per chunk, all at once
        got = paired_bootstrap_ci(a, b, n_boot=300, alpha=0.1, seed=5, method="index",
                                  chunk_elems=chunk)
        assert got == pytest.approx(ref, abs=1e-12)
    assert ref[0] == pytest.approx(5 / 37)


def test_bootstrap_ci_contains_true_delta_and_has_right_width():
    a, b = _pairs(300, 40, 40, 20)  # n = 400, delta = (40 - 20) / 400 = 0.05
    n = 400
    var_d = 60 / n - 0.05**2
    half = 1.959964 * math.sqrt(var_d / n)  # normal-approximation half-width, 0.0376
    for method in ("multinomial", "index"):
        delta, lo, hi = paired_bootstrap_ci(a, b, n_boot=10000, seed=0, method=method)
        assert delta == pytest.approx(0.05, abs=1e-15)
        assert lo < 0.05 < hi
        assert lo == pytest.approx(0.05 - half, abs=0.005)
        assert hi == pytest.approx(0.05 + half, abs=0.005)
        # every replicate is a multiple of 1/n, so the quantiles lie on that grid or between
        assert -1 <= lo <= hi <= 1


def test_bootstrap_multinomial_agrees_with_index_in_distribution():
    a, b = _pairs(120, 40, 25, 15)
    m = paired_bootstrap_ci(a, b, n_boot=40000, seed=1, method="multinomial", alpha=0.2)
    i = paired_bootstrap_ci(a, b, n_boot=40000, seed=2, method="index", alpha=0.2)
    assert m[0] == i[0] == pytest.approx(0.05)
    assert m[1] == pytest.approx(i[1], abs=0.004)
    assert m[2] == pytest.approx(i[2], abs=0.004)


def test_bootstrap_determinism_edge_cases_and_speed():
    a, b = _pairs(50, 20, 10, 5)
    assert paired_bootstrap_ci(a, b, seed=3) == paired_bootstrap_ci(a, b, seed=3)
    # (with 10,000 replicates the quantiles often land on the same 1/n grid point)
    assert paired_bootstrap_ci(a, b, n_boot=30, seed=3) != paired_bootstrap_ci(a, b, n_boot=30, seed=4)
    same = np.array([True, False, True])
    assert paired_bootstrap_ci(same, same) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_ci(np.zeros(4, bool), np.ones(4, bool)) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no pairs"):
        paired_bootstrap_ci(np.zeros(0, bool), np.zeros(0, bool))
    with pytest.raises(ValueError, match="alpha"):
        paired_bootstrap_ci(a, b, alpha=1.5)
    with pytest.raises(ValueError, match="method"):
        paired_bootstrap_ci(a, b, method="bca")
    # TSE-sized input, 10,000 replicates: well under a second
    big_a, big_b = _pairs(120_000, 20_000, 10_000, 8_084)
    t = time.perf_counter()
    delta, lo, hi = paired_bootstrap_ci(big_a, big_b, n_boot=10000)
    assert time.perf_counter() - t < 2.0  # typically ~10 ms; generous for loaded machines
    assert delta == pytest.approx(1916 / 158_084)
    assert lo < delta < hi


# --------------------------------------------------------------------------- accuracy tables


def test_accuracy_table_from_dict():
    tab = accuracy_table(
        {"p1": [True, True, False, True], "p2": [False, True], "p3": [True] * 4},
        phenomenon_of={"p1": "X", "p2": "X", "p3": "Y"},
    )
    par = tab.level("paradigm")
    assert {g: (r.n, r.n_correct, r.accuracy) for g, r in par.items()} == {
        "p1": (4, 3, 0.75), "p2": (2, 1, 0.5), "p3": (4, 4, 1.0),
    }
    ph = tab.level("phenomenon")
    assert (ph["X"].n, ph["X"].accuracy) == (6, pytest.approx(4 / 6))  # pooled, not mean of 0.75, 0.5
    assert (ph["Y"].n, ph["Y"].accuracy) == (4, 1.0)
    assert (tab.overall.n, tab.overall.n_correct, tab.overall.accuracy) == (10, 8, 0.8)
    assert [r.level for r in tab.rows] == ["paradigm"] * 3 + ["phenomenon"] * 2 + ["overall"]
    with pytest.raises(ValueError, match="no entry for: p3"):
        accuracy_table({"p3": [True]}, phenomenon_of={})


def test_accuracy_table_from_records_multi_source():
    recs = [
        {"source": "blimp", "paradigm": "p1", "pair_id": 0, "phenomenon": "X", "correct": True},
        {"source": "blimp", "paradigm": "p1", "pair_id": 1, "phenomenon": "X", "correct": False},
        PairRecord(source="tse", paradigm="p1", pair_id=0, phenomenon="p1", correct=True),
        PairRecord(source="tse-ml", paradigm="p1", pair_id=0, phenomenon="p1", correct=False,
                   correct_sum=True),
    ]
    tab = accuracy_table(recs)
    assert {g: r.accuracy for g, r in tab.level("paradigm").items()} == {
        "blimp:p1": 0.5, "tse:p1": 1.0, "tse-ml:p1": 0.0,
    }
    assert set(tab.level("phenomenon")) == {"blimp:X", "tse:p1", "tse-ml:p1"}
    assert tab.overall.accuracy == 0.5
    with pytest.raises(ValueError, match="no field 'correct_sum'"):
        accuracy_table(recs, correct_field="correct_sum")
    one_source = accuracy_table(recs[:2], group_keys=("paradigm",))
    assert list(one_source.level("paradigm")) == ["p1"]


# --------------------------------------------------------------------------- compare_runs


def _run(spec: dict[str, tuple[str, list[bool]]], source: str = "blimp") -> list[dict]:
    return [
        {"source": source, "paradigm": par, "pair_id": i, "phenomenon": ph, "correct": c}
        for par, (ph, cs) in spec.items()
        for i, c in enumerate(cs)
    ]


def test_compare_runs_constructed():
    rng = np.random.default_rng(0)
    a1, b1 = _pairs(30, 10, 2, 8)  # p1: A 38/50, B 32/50
    a2, b2 = _pairs(20, 5, 5, 0)  # p2: A 20/30, B 25/30
    a3, b3 = _pairs(15, 5, 0, 0)  # p3: identical
    run_a = _run({"p1": ("X", list(a1)), "p2": ("X", list(a2)), "p3": ("Y", list(a3))})
    run_b = _run({"p1": ("X", list(b1)), "p2": ("X", list(b2)), "p3": ("Y", list(b3))})
    run_b = [run_b[i] for i in rng.permutation(len(run_b))]  # order must not matter
    rows = compare_runs(run_a, run_b, n_boot=2000, seed=0)
    by = {(r.level, r.group): r for r in rows}
    assert [(r.level, r.group) for r in rows] == [
        ("paradigm", "p1"), ("paradigm", "p2"), ("paradigm", "p3"),
        ("phenomenon", "X"), ("phenomenon", "Y"), ("overall", "overall"),
    ]
    p1 = by[("paradigm", "p1")]
    assert (p1.n, p1.acc_a, p1.acc_b, p1.b01, p1.b10) == (50, 0.76, 0.64, 2, 8)
    assert p1.delta == pytest.approx(-0.12)
    assert p1.p_value == pytest.approx(_binom_two_sided(2, 10))  # 0.109375
    assert p1.ci_lo < -0.12 < p1.ci_hi
    p2 = by[("paradigm", "p2")]
    assert (p2.b01, p2.b10, p2.p_value) == (5, 0, pytest.approx(0.0625))
    p3 = by[("paradigm", "p3")]
    assert (p3.delta, p3.ci_lo, p3.ci_hi, p3.p_value) == (0.0, 0.0, 0.0, 1.0)
    x = by[("phenomenon", "X")]
    assert (x.n, x.b01, x.b10) == (80, 7, 8)
    assert x.acc_a == pytest.approx(58 / 80) and x.acc_b == pytest.approx(57 / 80)
    assert x.p_value == pytest.approx(_binom_two_sided(7, 15))
    ov = by[("overall", "overall")]
    assert (ov.n, ov.b01, ov.b10) == (100, 7, 8)
    assert ov.delta == pytest.approx(-0.01)
    assert ov.acc_a == pytest.approx(73 / 100) and ov.acc_b == pytest.approx(72 / 100)
    # row CI equals a direct call on the same pairs, in key order
    assert (p1.delta, p1.ci_lo, p1.ci_hi) == paired_bootstrap_ci(a1, b1, n_boot=2000, seed=0)


def test_compare_runs_mismatch_and_duplicates():
    run_a = _run({"p1": ("X", [True, False, True])})
    run_b = _run({"p1": ("X", [True, False])})
    with pytest.raises(RunMismatchError, match=r"A has 3, B has 2; 1 only in A \(e\.g\. \[\('blimp', 'p1', 2\)\]\)"):
        compare_runs(run_a, run_b)
    with pytest.raises(RunMismatchError, match="more than once"):
        compare_runs(run_a + run_a[:1], run_a + run_a[:1])
    other_source = _run({"p1": ("X", [True, False, True])}, source="tse")
    with pytest.raises(RunMismatchError, match="only in B"):
        compare_runs(run_a, other_source)
    relabelled = [dict(r, phenomenon="Z") for r in run_a]
    with pytest.raises(RunMismatchError, match="phenomenon is 'X' in run A but 'Z' in run B"):
        compare_runs(run_a, relabelled)
    assert compare_runs([], []) == []


def test_compare_runs_alternate_correct_field_and_sources():
    recs = [
        PairRecord(source=s, paradigm="agr", pair_id=i, phenomenon="agr",
                   correct=bool(i % 2), correct_sum=bool(i % 3))
        for s in ("tse", "tse-ml") for i in range(12)
    ]
    rows = compare_runs(recs, recs, group_keys=("paradigm",), correct_field="correct_sum")
    assert [r.group for r in rows] == ["tse-ml:agr", "tse:agr", "overall"]
    assert all(r.delta == 0 and r.p_value == 1.0 for r in rows)
    assert rows[-1].acc_a == pytest.approx(16 / 24)  # i % 3 != 0 for 8 of 12, per source


# --------------------------------------------------------------------------- one-sample bootstrap


def test_bootstrap_mean_ci_is_the_plain_loop_draw_for_draw():
    x = np.random.default_rng(11).normal(0.3, 1.0, 53)
    for seed in (7, [7, 123456]):
        rng = np.random.default_rng(seed)
        reps = [x[rng.integers(0, x.size, x.size)].mean() for _ in range(400)]
        want = tuple(float(q) for q in np.quantile(reps, [0.05, 0.95]))
        for chunk in (1, 53 * 6, 1 << 22):  # one replicate per chunk, 6 per chunk, all at once
            assert bootstrap_mean_ci(x, 400, 0.1, seed, chunk_elems=chunk) == want
    # numpy integer seeds count as int seeds
    assert bootstrap_mean_ci(x, 50, 0.1, 3) == bootstrap_mean_ci(x, 50, 0.1, np.int64(3))


def test_bootstrap_mean_ci_numbers():
    # x = (0, 1): a replicate mean is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 30% and 70% quantiles (alpha = 0.6) are both 1/2.
    assert bootstrap_mean_ci([0.0, 1.0], 4000, 0.6, 0) == (0.5, 0.5)
    # large n: percentile CI ~ mean +- z * sd(ddof=0) / sqrt(n) (normal approximation)
    x = np.random.default_rng(2).exponential(1.0, 2000)
    lo, hi = bootstrap_mean_ci(x, 4000, 0.05, 1)
    half = 1.959964 * x.std() / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - half, abs=0.01 * half + 0.003)
    assert hi == pytest.approx(x.mean() + half, abs=0.01 * half + 0.003)
    # and scipy's own percentile bootstrap (other draws) agrees to Monte Carlo error
    from scipy.stats import bootstrap

    ref = bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                    random_state=np.random.default_rng(5)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)
    # degenerate inputs
    assert bootstrap_mean_ci([2.5], 100, 0.05, 0) == (2.5, 2.5)
    assert bootstrap_mean_ci(np.full(9, -1.25), 100, 0.05, 0) == (-1.25, -1.25)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([], 100, 0.05, 0))
    assert all(math.isnan(v) for v in bootstrap_mean_ci([1.0, 2.0], 0, 0.05, 0))


# --------------------------------------------------------------------------- standard errors


def test_paired_diff_stderr_by_hand_and_against_numpy():
    # d = (1, 0, 0, 1): mean 1/2, sample variance 4 * (1/4) / 3 = 1/3, SE = sqrt(1/3 / 4) = sqrt(1/12)
    assert paired_diff_stderr([1, 0, 1, 1], [0, 0, 1, 0]) == pytest.approx(math.sqrt(1 / 12), rel=1e-15)
    assert paired_diff_stderr([1, 0, 1, 1], [0, 0, 1, 0]) == pytest.approx(0.28867513459481287, rel=1e-15)
    rng = np.random.default_rng(4)
    a = rng.random(500)
    b = 0.8 * a + 0.2 * rng.random(500)
    d = a - b
    want = d.std(ddof=1) / math.sqrt(d.size)
    from scipy.stats import sem

    assert paired_diff_stderr(a.tolist(), b.tolist()) == pytest.approx(want, rel=1e-12)
    assert paired_diff_stderr(a, b) == pytest.approx(sem(d), rel=1e-12)
    # correlated scores: much tighter than the unpaired SE of the two means
    unpaired = unpaired_diff_stderr(a.std(ddof=1) / math.sqrt(500), b.std(ddof=1) / math.sqrt(500))
    assert paired_diff_stderr(a, b) < 0.5 * unpaired
    assert paired_diff_stderr([0.3, 0.7, 0.1], [0.3, 0.7, 0.1]) == 0.0
    assert paired_diff_stderr([1.0, 2.0], [0.0, 0.0]) == pytest.approx(0.5)  # sd(1, 2) = 1/sqrt(2)
    with pytest.raises(ValueError, match="at least 2"):
        paired_diff_stderr([1.0], [0.0])
    with pytest.raises(ValueError, match="length"):
        paired_diff_stderr([1.0, 2.0], [0.0])


def test_unpaired_diff_stderr():
    assert unpaired_diff_stderr(0.03, 0.04) == pytest.approx(0.05, rel=1e-15)
    assert unpaired_diff_stderr(0.05, 0.05) == pytest.approx(math.sqrt(0.005), rel=1e-15)
    assert unpaired_diff_stderr(0.0, 0.02) == 0.02


def test_minimal_detectable_effect():
    from eval.stats import minimal_detectable_effect

    z = 1.959963984540054 + 0.8416212335729143
    assert minimal_detectable_effect(1005, 0.05) == pytest.approx(z * (0.05 / 1005) ** 0.5, rel=1e-12)
    assert minimal_detectable_effect(1005, 0.05) == pytest.approx(0.019761, abs=1e-6)  # ~2 points
    assert minimal_detectable_effect(67_000, 0.05) == pytest.approx(0.002420, abs=1e-6)
    assert minimal_detectable_effect(100, 0.0) == 0.0
    assert math.isnan(minimal_detectable_effect(0, 0.1))
    # stricter level, higher power: larger
    assert minimal_detectable_effect(1000, 0.1, alpha=0.01, power=0.9) > minimal_detectable_effect(1000, 0.1)
    with pytest.raises(ValueError):
        minimal_detectable_effect(10, 1.5)


def test_comparison_rows_carry_their_mde():
    from eval.stats import compare_runs, minimal_detectable_effect

    a = [{"source": "blimp", "paradigm": "p", "pair_id": i, "correct": i % 2 == 0} for i in range(200)]
    b = [{**r, "correct": r["correct"] if r["pair_id"] % 10 else not r["correct"]} for r in a]
    row = compare_runs(a, b, group_keys=())[0]
    assert (row.b01 + row.b10) == 20
    assert row.mde == pytest.approx(minimal_detectable_effect(200, 20 / 200))


def _records(correct: np.ndarray, order: np.ndarray | None = None) -> list[dict]:
    """BLiMP-like records of ``correct`` in 4 paradigms, listed in ``order``."""
    idx = np.arange(correct.size) if order is None else order
    return [{"source": "blimp", "paradigm": f"p{i % 4}", "pair_id": int(i), "phenomenon": "x",
             "correct": bool(correct[i])} for i in idx]


def test_pooled_difference_against_numpy():
    """A against three draws: delta, CI (the plain bootstrap loop over pairs sorted by key),
    t-test p and MDE computed here by hand; record order does not matter."""
    rng = np.random.default_rng(5)
    n = 600
    a = rng.random(n) < 0.62
    draws = [rng.random(n) < q for q in (0.74, 0.78, 0.75)]
    *groups, row = pooled_paired_difference(_records(a), [_records(d, rng.permutation(n)) for d in draws],
                                            ("paradigm",), n_boot=400, seed=3)
    order = sorted(range(n), key=lambda i: (f"p{i % 4}", i))
    d = a[order].astype(float) - np.mean([x[order] for x in draws], axis=0)
    assert row.delta == pytest.approx(a.mean() - np.mean([x.mean() for x in draws]))
    assert row.delta == pytest.approx(d.mean())
    loop = np.random.default_rng(3)
    reps = [d[loop.integers(0, n, n)].mean() for _ in range(400)]
    assert (row.ci_lo, row.ci_hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    assert row.p_value == pytest.approx(2 * (1 - __import__("scipy").stats.t.cdf(abs(t), n - 1)))
    assert row.mde == pytest.approx((1.959964 + 0.841621) * d.std(ddof=1) / math.sqrt(n), rel=1e-5)
    assert row.acc_a == pytest.approx(a.mean()) and row.n == n
    assert row.b01 == int((d < 0).sum()) and row.b10 == int((d > 0).sum())
    assert row.ci_lo < row.delta < row.ci_hi < 0  # A is clearly worse than the draws here
    assert [g.group for g in groups] == ["p0", "p1", "p2", "p3"] and row.level == "overall"
    for k, g in enumerate(groups):  # each paradigm: its own pairs, its own bootstrap with the same seed
        sel = np.arange(n) % 4 == k
        dk = a[sel].astype(float) - np.mean([x[sel] for x in draws], axis=0)
        loop = np.random.default_rng(3)
        reps = [dk[loop.integers(0, dk.size, dk.size)].mean() for _ in range(400)]
        assert g.n == sel.sum() and g.delta == pytest.approx(dk.mean())
        assert (g.ci_lo, g.ci_hi) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))


def test_pooled_difference_narrows_the_single_draw_interval_and_refuses_other_pairs():
    """One draw gives the paired comparison's delta (sign flipped: A minus the draw); pooling
    three noisy draws of one control gives a narrower CI than any of them alone; a draw on
    other pairs, or no draw at all, is refused."""
    rng = np.random.default_rng(9)
    n = 5000
    a = rng.random(n) < 0.75
    draws = [rng.random(n) < 0.75 for _ in range(3)]
    (single,) = [r for r in compare_runs(_records(draws[0]), _records(a), group_keys=(), n_boot=300) if
                 r.level == "overall"]
    (one,) = pooled_paired_difference(_records(a), [_records(draws[0])], n_boot=300)
    assert one.delta == pytest.approx(single.delta)
    assert one.mde == pytest.approx(single.mde, rel=0.02)
    (pooled,) = pooled_paired_difference(_records(a), [_records(x) for x in draws], n_boot=300)
    widths = [pooled_paired_difference(_records(a), [_records(x)], n_boot=300)[-1] for x in draws]
    # independent draws: sd(d) from sqrt(2) s to sqrt(4/3) s, the width by about 0.82
    assert pooled.ci_hi - pooled.ci_lo < 0.9 * np.mean([w.ci_hi - w.ci_lo for w in widths])
    with pytest.raises(RunMismatchError, match="draw 1 covers other pairs"):
        pooled_paired_difference(_records(a), [_records(draws[0]), _records(draws[1][:-1])])
    with pytest.raises(ValueError, match="no draws"):
        pooled_paired_difference(_records(a), [])
