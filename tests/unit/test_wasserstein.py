"""Exact and streaming W1-to-N(0,1) scores (``vllm_negablate.discovery.wasserstein``)."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.integrate as si
import scipy.stats as st
import torch
from scipy.special import ndtr, ndtri

from vllm_negablate.discovery.streaming import StreamingW1Estimator
from vllm_negablate.discovery.wasserstein import (
    exact_w1_below_columns,
    exact_w1_split_columns,
    exact_w1_to_std_normal,
    exact_w1_to_std_normal_columns,
    standardize_columns,
    std_normal_cdf_antiderivative,
    top_percent_mask,
    w1_histogram_below,
    w1_histogram_to_std_normal,
    w1_negative_part,
)


def _std(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / x.std()


def _quad_abs(f, a: float, b: float, points=()) -> float:
    """Adaptive quadrature of |f| over [a, b] split at the given points."""
    cuts = [a, *sorted(p for p in points if a < p < b), b]
    return sum(
        si.quad(lambda x: abs(f(x)), lo, hi, epsabs=1e-13, epsrel=1e-12, limit=200)[0]
        for lo, hi in zip(cuts[:-1], cuts[1:])
        if hi > lo
    )


def _quad_empirical(zs: np.ndarray, lo=-np.inf, hi=np.inf) -> float:
    """integral_lo^hi |F_n - Phi| by quadrature, interval by interval."""
    zs = np.sort(zs)
    n = zs.size
    knots = np.concatenate([[-np.inf], zs, [np.inf]])
    total = 0.0
    for k in range(n + 1):
        a, b = max(knots[k], lo), min(knots[k + 1], hi)
        if not a < b:
            continue
        c = k / n
        root = ndtri(c) if 0 < c < 1 else np.nan
        # quad handles the infinite tails; split finite pieces at the root and 0
        total += _quad_abs(lambda x, c=c: c - ndtr(x), a, b, points=(root, 0.0))
    return total


# ---------------------------------------------------------------------------------------
# Exact W1 of a sample
# ---------------------------------------------------------------------------------------


def test_antiderivative():
    x = np.linspace(-8, 8, 33)
    g = std_normal_cdf_antiderivative(x)
    num = [si.quad(ndtr, -np.inf, v, epsabs=1e-14)[0] for v in x]
    np.testing.assert_allclose(g, num, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(std_normal_cdf_antiderivative(-x), g - x, atol=1e-13)


@pytest.mark.parametrize("seed", [0, 1])
def test_closed_form_matches_quadrature(seed):
    rng = np.random.default_rng(seed)
    z = _std(rng.standard_t(3, 25))
    total, neg = exact_w1_split_columns(z)
    assert abs(total[0] - _quad_empirical(z)) < 1e-9
    assert abs(neg[0] - _quad_empirical(z, hi=0.0)) < 1e-9
    assert abs(w1_negative_part(z) - neg[0]) == 0.0
    # a sample entirely on one side of zero exercises the tail formulas
    for shift in (-5.0, 5.0):
        y = rng.normal(shift, 0.3, 7)
        t, n = exact_w1_split_columns(y)
        assert abs(t[0] - _quad_empirical(y)) < 1e-9
        assert abs(n[0] - _quad_empirical(y, hi=0.0)) < 1e-9


def test_exact_matches_scipy_with_normal_reference():
    rng = np.random.default_rng(7)
    quantiles = ndtri((np.arange(1_000_000) + 0.5) / 1_000_000)
    big_normal = np.random.default_rng(8).standard_normal(1_000_000)
    samples = {
        "gauss": rng.standard_normal(3000),
        "t3": rng.standard_t(3, 3000),
        "bimodal": np.where(
            rng.random(3000) < 0.8, rng.normal(-2, 0.4, 3000), rng.normal(1, 1, 3000)
        ),
    }
    for name, x in samples.items():
        z = _std(x)
        w = exact_w1_to_std_normal(z)
        # a fine quantile grid approximates N(0, 1) to ~1e-6 in W1
        assert abs(w - st.wasserstein_distance(z, quantiles)) < 1e-5, name
        # the reference code's method (a random normal sample): sampling noise ~1e-3
        assert abs(w - st.wasserstein_distance(z, big_normal)) < 1.5e-3, name


def test_columns_and_split_consistency():
    rng = np.random.default_rng(3)
    e = rng.exponential(1, 500)
    h = np.stack([rng.standard_normal(500), e, -e], 1)
    z = standardize_columns(h)
    cols = exact_w1_to_std_normal_columns(z)
    single = [exact_w1_to_std_normal(z[:, j]) for j in range(3)]
    np.testing.assert_allclose(cols, single, rtol=0, atol=1e-15)
    total, neg = exact_w1_split_columns(z)
    pos = exact_w1_split_columns(-z)[1]  # the positive part is the negative part of -z
    np.testing.assert_allclose(neg + pos, total, rtol=0, atol=1e-13)
    # the exponential and its mirror image swap their negative and positive parts
    assert abs(neg[1] - pos[2]) < 1e-13 and abs(neg[2] - pos[1]) < 1e-13
    # constant neuron: NaN, not an exception
    assert np.isnan(exact_w1_to_std_normal_columns(standardize_columns(np.ones((10, 1))))[0])


def test_histogram_closed_form_matches_quadrature():
    rng = np.random.default_rng(11)
    edges = np.sort(rng.normal(0, 1.5, 13))
    edges[4] = edges[5]  # a zero-width bin is a point mass
    counts = rng.integers(0, 5, 12).astype(float)
    counts[4] = 3.0
    counts[0] = 1.0
    total_mass = counts.sum()
    cum = np.concatenate([[0], np.cumsum(counts)]) / total_mass

    def cdf(x):
        if x < edges[0]:
            return 0.0
        if x >= edges[-1]:
            return 1.0
        j = np.searchsorted(edges, x, side="right") - 1
        w = edges[j + 1] - edges[j]
        return cum[j] + (cum[j + 1] - cum[j]) * (x - edges[j]) / w if w > 0 else cum[j + 1]

    f = lambda x: cdf(x) - ndtr(x)  # noqa: E731
    pts = list(edges) + [0.0]
    num_total = (
        _quad_abs(f, -np.inf, edges[0])
        + _quad_abs(f, edges[0], edges[-1], pts)
        + _quad_abs(f, edges[-1], np.inf)
    )
    num_neg = _quad_abs(f, -np.inf, min(edges[0], 0)) + _quad_abs(f, edges[0], 0.0, pts)
    w, n = w1_histogram_to_std_normal(edges, counts)
    assert abs(w[0] - num_total) < 1e-7
    assert abs(n[0] - num_neg) < 1e-7
    # point masses only: equals the exact empirical formula
    z = _std(rng.standard_t(4, 40))
    e = np.repeat(np.sort(z), 2)
    c = np.zeros(e.size - 1)
    c[0::2] = 1.0
    w, n = w1_histogram_to_std_normal(e, c)
    t2, n2 = exact_w1_split_columns(z)
    assert abs(w[0] - t2[0]) < 1e-12 and abs(n[0] - n2[0]) < 1e-12


# ---------------------------------------------------------------------------------------
# Streaming estimator
# ---------------------------------------------------------------------------------------

T_STREAM = 40_000
K_STREAM = 8


def _dist(name: str) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    t, k = T_STREAM, K_STREAM
    if name == "gaussian":
        return rng.normal(rng.uniform(-3, 3, k), rng.uniform(0.1, 5, k), (t, k))
    if name == "student_t3":
        return rng.standard_t(3, (t, k)) * rng.uniform(0.5, 2, k)
    if name == "gelu_like_mixture":  # big negative-side mode plus a wide positive one
        w = rng.uniform(0.6, 0.95, k)
        neg = rng.normal(rng.uniform(-3, -1, k), rng.uniform(0.2, 0.6, k), (t, k))
        pos = rng.normal(rng.uniform(-0.5, 1.5, k), rng.uniform(0.5, 2, k), (t, k))
        return np.where(rng.random((t, k)) < w, neg, pos)
    if name == "drift":  # warm-up (first batch) statistics are far from the final ones
        x = rng.normal(0, 1, (t, k))
        x[4096:] = x[4096:] * 50 + 300
        return x
    raise KeyError(name)


def _stream(x, est=None, batch=2048, **kw):
    est = est or StreamingW1Estimator(**kw)
    for s in range(0, x.shape[0], batch):
        est.update(x[s : s + batch])
    return est


KERNELS = ["torch", "numba"]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", ["gaussian", "student_t3", "gelu_like_mixture", "drift"])
def test_streaming_matches_exact(name, kernel):
    x = _dist(name).astype(np.float32)
    exact_w, exact_n = exact_w1_split_columns(standardize_columns(x))
    est = _stream(torch.from_numpy(x), kernel=kernel)
    assert est.uses_cpu_kernels == (kernel == "numba")
    r = est.finalize()
    assert np.abs(r["w1"] - exact_w).max() <= 1e-3
    assert np.abs(r["w1_negative"] - exact_n).max() <= 1e-3
    assert (r["count"] == x.shape[0]).all() and (r["out_of_range"] == 0).all()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(r["mean"], x64.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(r["std"], x64.std(0), rtol=1e-9)
    np.testing.assert_allclose(r["skew"], st.skew(x64), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(r["kurtosis"], st.kurtosis(x64), rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(r["w1_negative"] + r["w1_positive"], r["w1"], atol=1e-14)
    # the part at negative raw pre-activations (h < 0) and the share of such tokens
    z = standardize_columns(x64)
    exact_h, exact_frac = exact_w1_below_columns(z, -x64.mean(0) / x64.std(0))
    assert np.abs(r["w1_h_negative"] - exact_h).max() <= 1e-3
    assert np.abs(r["frac_h_negative"] - (x64 < 0).mean(0)).max() <= 2e-3
    np.testing.assert_array_equal(exact_frac, (x64 < 0).mean(0))


def test_the_part_below_any_split_matches_quadrature():
    rng = np.random.default_rng(11)
    samples = [rng.gamma(2.0, 1.0, 60), -rng.gamma(2.0, 1.0, 60) + 0.5, rng.standard_t(3, 60) - 0.4]
    for x in samples:
        z = _std(x)
        for split in (-2.5, -0.7, 0.0, 0.3, 1.9, z.min() - 1, z.max() + 1):
            below, frac = exact_w1_below_columns(z[:, None], np.array([split]))
            assert below[0] == pytest.approx(_quad_empirical(z, hi=split), abs=1e-10), split
            assert frac[0] == (z < split).mean()
        w, wn = exact_w1_split_columns(z[:, None])
        assert exact_w1_below_columns(z[:, None], np.array([0.0]))[0][0] == pytest.approx(wn[0], abs=1e-14)
        assert exact_w1_below_columns(z[:, None], np.array([np.inf]))[0][0] == pytest.approx(w[0], abs=1e-14)
        assert exact_w1_below_columns(z[:, None], np.array([-np.inf]))[0][0] == pytest.approx(0.0, abs=1e-15)


def test_histogram_part_below_any_split_matches_quadrature():
    rng = np.random.default_rng(12)
    edges = np.sort(rng.normal(0.2, 1.3, (3, 9)), axis=1)
    edges[1, 4] = edges[1, 3]  # a point mass
    counts = rng.integers(0, 5, (3, 8)).astype(np.float64) + np.array([[1.0] * 8, [0.0] * 8, [1.0] * 8])
    counts[1, 3] = 4.0
    w, wn = w1_histogram_to_std_normal(edges, counts)
    for split in (-3.0, -0.6, 0.0, 0.25, 1.4, 5.0):
        got, mass = w1_histogram_below(edges, counts, np.full(3, split))
        for i in range(3):
            e, c = edges[i], counts[i]
            cdf = np.concatenate([[0.0], np.cumsum(c) / c.sum()])

            def f(x, e=e, cdf=cdf):
                return np.interp(x, e, cdf, left=0.0, right=1.0) - ndtr(x)

            want = _quad_abs(f, -np.inf, split, points=(*e, 0.0))
            assert got[i] == pytest.approx(want, abs=1e-9), (i, split)
            # the mass below: whole pieces, the cut piece's uniform share, an atom below
            assert mass[i] == pytest.approx(np.interp(split, e, cdf, left=0.0, right=1.0)
                                            if split not in e else cdf[np.searchsorted(e, split, side="right") - 1],
                                            abs=1e-12)
    np.testing.assert_allclose(w1_histogram_below(edges, counts, np.zeros(3))[0], wn, atol=1e-14)
    np.testing.assert_allclose(w1_histogram_below(edges, counts, np.full(3, np.inf))[0], w, atol=1e-14)


def test_out_of_range_is_reported():
    # a warm-up scale 1e6 times too small puts later tokens outside the grid: flagged
    rng = np.random.default_rng(9)
    x = np.concatenate([rng.normal(0, 1e-6, (1024, 2)), rng.normal(0, 1, (1024, 2))])
    r = _stream(x.astype(np.float32), batch=1024).finalize()
    assert (r["out_of_range"] > 0.4).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_streaming_bfloat16_lattice(kernel):
    # bf16 values sit on a coarse lattice (here ~0.2 std apart for some neurons): bins
    # holding few lattice points are modelled as point masses, not uniform densities.
    rng = np.random.default_rng(5)
    k = K_STREAM
    x = rng.normal(rng.uniform(-8, 8, k), rng.uniform(0.02, 0.5, k), (T_STREAM, k))
    xb = torch.from_numpy(x).to(torch.bfloat16)
    exact_w, exact_n = exact_w1_split_columns(standardize_columns(xb.double().numpy()))
    est = _stream(xb, kernel=kernel)
    assert est.lattice == "bfloat16"
    r = est.finalize()
    assert np.abs(r["w1"] - exact_w).max() <= 1e-3
    assert np.abs(r["w1_negative"] - exact_n).max() <= 1e-3


def test_few_tokens_are_exact():
    x = np.random.default_rng(2).standard_t(3, (300, 4))
    est = _stream(x, batch=100)  # fewer tokens than the warm-up: all still buffered
    assert not est.has_grid
    r = est.finalize()
    exact = exact_w1_to_std_normal_columns(standardize_columns(x))
    np.testing.assert_allclose(r["w1"], exact, atol=1e-12)
    below, frac = exact_w1_below_columns(standardize_columns(x), -x.mean(0) / x.std(0))
    np.testing.assert_allclose(r["w1_h_negative"], below, atol=1e-12)
    np.testing.assert_array_equal(r["frac_h_negative"], (x < 0).mean(0))


@pytest.mark.parametrize("kernel", KERNELS)
def test_merge_of_two_halves_equals_one_pass(kernel):
    x = torch.from_numpy(_dist("gelu_like_mixture")[:20_000].astype(np.float32))
    whole = _stream(x, kernel=kernel)
    first = _stream(x[:10_000], kernel=kernel)
    second = _stream(x[10_000:], est=first.empty_like())  # same grid as `first`
    first.merge(second)
    assert first.count == whole.count
    assert torch.equal(first.hist, whole.hist)
    a, b = first.finalize(), whole.finalize()
    for key in ("mean", "std", "skew", "kurtosis", "w1", "w1_negative"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-12, err_msg=key)
    # a shard still in warm-up is binned onto the other's grid when merged
    early = _stream(x[:300], batch=100, kernel=kernel)
    late = _stream(x[300:], est=StreamingW1Estimator(kernel=kernel))
    with pytest.raises(ValueError):
        _stream(x[:5000]).merge(late)  # different grids refuse to merge
    late.merge(early)
    assert late.count == 20_000 and (late.hist.sum(1) == 20_000).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_agree_with_the_torch_reference(dtype):
    # The numba kernels and the torch formulation: same moments to float64 rounding, the
    # same bins but for values within ~1e-7 of an edge (torch's float32 asinh vs a lookup
    # against float32 edges; bf16 values sit on lattice points, so they move in lumps),
    # hence the same scores. Against bins from a float64 asinh of the same standardized
    # values the lookup is the exact one (measured: 0-1 values off, torch 21-177).
    x = torch.from_numpy(_dist("gelu_like_mixture")).to(dtype)
    ref, fast = _stream(x, kernel="torch"), _stream(x, kernel="numba")
    assert ref.count == fast.count == T_STREAM
    values = T_STREAM * K_STREAM
    assert (ref.hist - fast.hist).abs().sum().item() / 2 <= 1e-3 * values
    c = ref.center.to(torch.float32)
    inv = ref._inv_scale().to(torch.float32)
    y = ((x.to(torch.float32) - c) * inv).double().numpy()
    b = np.clip(np.floor((np.arcsinh(y) + ref.u_max) / ref.du), -1, ref.nbins).astype(int) + 1
    exact = np.zeros(ref.hist.shape, dtype=np.int64)
    np.add.at(exact, (np.broadcast_to(np.arange(K_STREAM), b.shape), b), 1)
    assert np.abs(fast.hist.numpy() - exact).sum() / 2 <= 1e-5 * values
    for name in ("mean", "m2", "m3", "m4", "min", "max"):
        torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=1e-11,
                                   atol=1e-9, msg=name)
    a, b = ref.finalize(), fast.finalize()
    for key in ("w1", "w1_negative", "skew", "kurtosis"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=2e-5, err_msg=key)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernels_read_strided_batches_and_any_width(dtype):
    # vLLM's gate is a column slice of the fused gate/up output: the kernels read it in
    # place; 37 neurons leave a partial block and split unevenly across two threads.
    rng = np.random.default_rng(11)
    wide = torch.from_numpy(rng.standard_t(4, (6000, 74)).astype(np.float32)).to(dtype)
    gate = wide[:, :37]
    assert not gate.is_contiguous()
    strided = _stream(gate, kernel="numba")
    packed = _stream(gate.contiguous(), kernel="numba")
    reference = _stream(gate, kernel="torch")
    assert torch.equal(strided.hist, packed.hist)
    assert (strided.hist - reference.hist).abs().sum().item() / 2 <= 1e-3 * gate.numel()
    for name in ("mean", "m2", "min", "max"):
        torch.testing.assert_close(getattr(strided, name), getattr(packed, name), rtol=0, atol=0)
        torch.testing.assert_close(getattr(strided, name), getattr(reference, name),
                                   rtol=1e-11, atol=1e-9)


@pytest.mark.parametrize("chunk_elements", [1 << 22, 100 * K_STREAM])
def test_cpu_kernels_refuse_non_finite_values_and_keep_the_state(chunk_elements):
    # once the grid is set, moments and counts are done in one read: a NaN in the 8th of
    # 10 chunks of 100 rows means 7 chunks' counts are taken back out
    x = torch.from_numpy(_dist("student_t3")[:4096].astype(np.float32))
    est = _stream(x, kernel="numba", chunk_elements=chunk_elements)
    before = {k: v.copy() if isinstance(v, np.ndarray) else v
              for k, v in est.state_dict().items()}
    bad = x[:1000].clone()
    bad[700, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        est.update(bad)
    bad[700, 3] = float("-inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        est.update(bad)
    after = est.state_dict()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_kernel_choice_is_validated():
    with pytest.raises(ValueError, match="kernel must be one of"):
        StreamingW1Estimator(kernel="fortran")


def test_state_dict_round_trip(tmp_path):
    x = torch.from_numpy(_dist("student_t3")[:6000].astype(np.float32))
    est = _stream(x, batch=1000)
    np.savez(tmp_path / "s.npz", **est.state_dict())
    loaded = StreamingW1Estimator.from_state_dict(dict(np.load(tmp_path / "s.npz")))
    a, b = est.finalize(), loaded.finalize()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # it can go on streaming from where it stopped
    loaded.update(x[:100])
    assert loaded.count == 6100


def test_memory_is_independent_of_token_count():
    rng = np.random.default_rng(0)
    k = 16
    est = StreamingW1Estimator()
    est.update(rng.standard_normal((1000, k)).astype(np.float32))
    after_1k = est.memory_bytes()
    for _ in range(99):
        est.update(rng.standard_normal((1000, k)).astype(np.float32))
    assert est.count == 100_000
    assert est.memory_bytes() == after_1k
    assert after_1k == k * ((est.nbins + 2) * 4 + 8 * 8)


# ---------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------


def test_top_percent_mask_matches_numpy_reference():
    rng = np.random.default_rng(4)
    for k, p in [(11008, 1.0), (4096, 0.5), (1000, 10.0), (7, 50.0)]:
        s = rng.random(k)
        ref = s > np.percentile(s, 100 - p)
        mask = top_percent_mask(s, p)
        np.testing.assert_array_equal(mask, ref)
    # distinct scores: K - 1 - floor((1 - p/100) (K - 1)) selected, 111 of 11008 at 1%
    assert top_percent_mask(rng.random(11008), 1.0).sum() == 111
    # ties at the threshold are left out together; equal scores select nothing
    np.testing.assert_array_equal(top_percent_mask(np.array([1.0, 2, 2, 2]), 50), [0, 0, 0, 0])
    assert not top_percent_mask(np.ones(10), 10).any()
    assert not top_percent_mask(np.arange(10.0), 0).any()
    # NaN scores are skipped, never selected
    s = np.array([np.nan, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(top_percent_mask(s, 20), [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1])
    with pytest.raises(ValueError):
        top_percent_mask(s, 101)
