"""Discovery observer, worker RPCs, TP merging, set builders and the perplexity search."""

from __future__ import annotations

import json
import pickle

import msgspec
import numpy as np
import pytest
import torch
from torch import nn

from vllm_negablate.context import set_runtime
from vllm_negablate.discovery.collector import (
    PreactivationObserver,
    concat_neuron_shards,
    from_wire,
    merge_tp_scores,
    merge_tp_states,
    to_wire,
)
from vllm_negablate.discovery.corpus import make_windows, read_corpus_text
from vllm_negablate.discovery.matching import perplexity_matched
from vllm_negablate.discovery.recipes import (
    candidate_order,
    fraction_set,
    mode_variant,
    random_control,
    restrict_layers,
    wasserstein_set,
)
from vllm_negablate.discovery.streaming import StreamingW1Estimator
from vllm_negablate.discovery.wasserstein import (
    exact_w1_to_std_normal_columns,
    top_percent_mask,
)
from vllm_negablate.discovery.worker_methods import DiscoveryWorkerMixin
from vllm_negablate.neuron_set import AblationMode, ModelFingerprint
from vllm_negablate.step_plan import StepPlan

K, TP = 12, 3


def _exact_w1(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return exact_w1_to_std_normal_columns((x - x.mean(0)) / x.std(0))


def _data(t: int, k: int = K, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t, k, generator=g)
    # heavy tails / skew in some columns so W1 differs between neurons
    base[:, 0::4] = base[:, 0::4] ** 3
    base[:, 1::4] = torch.exp(base[:, 1::4])
    return base


# ------------------------------------------------------------------- observer
def test_observer_ignores_none_plan_and_trims_padding():
    obs = PreactivationObserver(warmup_tokens=16)
    x = _data(40)
    obs.observe(0, torch.full((8, K), 1e6), None)  # profile run: ignored
    padded = torch.cat([x[:25], torch.full((7, K), 1e6)])  # 7 padding rows
    obs.observe(0, padded, StepPlan(num_tokens=25))
    obs.observe(0, x[25:], StepPlan(num_tokens=15))
    assert obs.ignored_calls == 1 and obs.padding_rows == 7
    assert obs.tokens == {0: 40}
    st = obs.state()
    assert st["layers"][0]["count"] == 40
    assert float(np.max(st["layers"][0]["max"])) < 1e5  # no padding value got in
    ref = StreamingW1Estimator(warmup_tokens=16)  # grid fitted to exactly the first 16 tokens
    ref.update(x[:16])
    ref.update(x[16:])
    np.testing.assert_allclose(obs.finalize()["layers"][0]["w1"], ref.finalize()["w1"], atol=1e-12)


def test_observer_result_does_not_depend_on_step_sizes():
    x = _data(400, seed=7)
    results = []
    for steps in ([400], [3, 10, 200, 187], [100] * 4, [60, 1, 339]):
        obs = PreactivationObserver(warmup_tokens=64)
        start = 0
        for n in steps:
            obs.observe(0, x[start:start + n], StepPlan(num_tokens=n))
            start += n
        results.append(obs.finalize()["layers"][0])
    for r in results[1:]:
        for key in ("w1", "w1_negative", "mean", "std", "skew", "kurtosis"):
            np.testing.assert_allclose(r[key], results[0][key], rtol=1e-10, atol=1e-13, err_msg=key)
    assert np.abs(results[0]["w1"] - _exact_w1(x.numpy())).max() < 0.02  # binned, 400 tokens


def test_observer_max_tokens_keep_exact_layers_and_errors():
    obs = PreactivationObserver(max_tokens=30, keep_exact=10, layers=[1], warmup_tokens=8)
    x = _data(50)
    for start in range(0, 50, 20):
        chunk = x[start:start + 20]
        obs.observe(0, chunk, StepPlan(num_tokens=chunk.shape[0]))  # layer 0 not wanted
        obs.observe(1, chunk, StepPlan(num_tokens=chunk.shape[0]))
    assert obs.tokens == {1: 30} and 0 not in obs.estimators
    st = obs.state()
    np.testing.assert_array_equal(st["exact"][1], x[:10].numpy())
    np.testing.assert_allclose(st["layers"][1]["mean"], x[:30].double().mean(0).numpy(), rtol=1e-12)
    # a failure inside the hook is recorded, never raised into the forward pass
    bad = PreactivationObserver()
    bad.observe(0, torch.full((4, K), float("nan")), StepPlan(num_tokens=4))
    assert bad.error and "NaN" in bad.error
    bad.observe(0, x[:4], StepPlan(num_tokens=4))  # stopped after the error
    assert bad.tokens == {}


def test_observer_through_worker_runtime_apply():
    """The real WorkerRuntime.apply calls the observer before the clamp, with its plan."""
    from vllm_negablate.neuron_set import LayerAblation, NeuronSet
    from vllm_negablate.runtime import WorkerRuntime

    class SiluAndMul(nn.Module):
        def forward(self, x):
            d = x.shape[-1] // 2
            return torch.nn.functional.silu(x[..., :d]) * x[..., d:]

    class Proj(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2 * K, 4))
            self.output_size_per_partition = 2 * K

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj, self.act_fn = Proj(), SiluAndMul()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = MLP()

    model = nn.Module()
    model.layers = nn.ModuleList([Layer()])
    fp = ModelFingerprint(architecture="Fake", num_layers=1, intermediate_size=K)
    rt = WorkerRuntime.for_model(model, fp, dtype=torch.float32, device="cpu")
    rt.load_set(NeuronSet(name="all", model=fp, entries=[LayerAblation(layer=0, neurons=list(range(K)))]))
    rt.set_default("all")
    obs = PreactivationObserver(warmup_tokens=4)
    rt.observer = obs
    set_runtime(rt)
    try:
        act = model.layers[0].mlp.act_fn
        x = _data(6, 2 * K)
        rt.begin_step(["r"], {"r": 5}, {"r": None})  # 5 real tokens + 1 padding row
        act(x.clone())
        rt.end_step()
        act(x.clone())  # dummy run after the step: plan None, ignored
    finally:
        set_runtime(None)
    assert obs.tokens == {0: 5} and obs.ignored_calls == 1 and obs.padding_rows == 1
    # recorded before the clamp: negative gate values are still there
    np.testing.assert_allclose(obs.state()["layers"][0]["min"], x[:5, :K].double().min(0).values.numpy())
    assert float(x[:5, :K].min()) < 0


# -------------------------------------------------------------------- TP merge
def _shard_observers(x: torch.Tensor, tp: int, warmup: int):
    w = x.shape[1] // tp
    obs = [PreactivationObserver(warmup_tokens=warmup, keep_exact=5) for _ in range(tp)]
    for start in range(0, x.shape[0], 37):  # steps of 37 tokens + 3 padding rows
        chunk = x[start:start + 37]
        plan = StepPlan(num_tokens=chunk.shape[0])
        for r, o in enumerate(obs):
            for layer in (0, 1):
                h = torch.cat([chunk[:, r * w:(r + 1) * w] + layer, torch.zeros(3, w)])
                o.observe(layer, h, plan)
    return obs


@pytest.mark.parametrize("warmup", [64, 1000])  # binned, and still in warm-up (exact)
def test_tp_shard_merge_gives_global_order(warmup):
    x = _data(300, K, seed=3)
    obs = _shard_observers(x, TP, warmup)
    replies = [{"tp_rank": r, "tp_size": TP, "layers": o.state()["layers"]} for r, o in enumerate(obs)]
    replies = replies[::-1]  # arrival order must not matter
    merged = merge_tp_states(replies)
    assert sorted(merged) == [0, 1]
    full = PreactivationObserver(warmup_tokens=warmup)
    for start in range(0, 300, 37):
        for layer in (0, 1):
            full.observe(layer, x[start:start + 37] + layer, StepPlan(num_tokens=len(x[start:start + 37])))
    for layer in (0, 1):
        got = StreamingW1Estimator.from_state_dict(merged[layer]).finalize()
        # rank-local grids differ from a single-rank run only through per-neuron centers,
        # which are per-neuron anyway: identical results
        ref = full.finalize()["layers"][layer]
        for key in ("w1", "w1_negative", "mean", "std", "skew", "kurtosis"):
            np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, atol=1e-12, err_msg=key)
        if warmup > 300:
            np.testing.assert_allclose(got["w1"], _exact_w1(x.numpy() + layer), atol=1e-9)
    # finalized-on-worker scores merge to the same arrays
    scores = merge_tp_scores([{"tp_rank": r, "tp_size": TP, "layers": o.finalize()["layers"]}
                              for r, o in enumerate(obs)])
    for layer in (0, 1):
        np.testing.assert_allclose(
            scores[layer]["w1"], StreamingW1Estimator.from_state_dict(merged[layer]).finalize()["w1"],
            rtol=1e-12)
        assert scores[layer]["w1"].shape == (K,)


def test_tp_merge_rejects_inconsistent_shards():
    x = _data(100)
    obs = _shard_observers(x, 2, 32)
    states = [o.state()["layers"][0] for o in obs]
    with pytest.raises(ValueError, match="tp ranks"):
        merge_tp_states([{"tp_rank": 0, "tp_size": 2, "layers": {0: states[0]}}])
    other = PreactivationObserver(warmup_tokens=32)
    other.observe(0, x[:50, :6], StepPlan(num_tokens=50))
    with pytest.raises(ValueError, match="count"):
        concat_neuron_shards([states[0], other.state()["layers"][0]])


def test_wire_format_roundtrips_through_msgpack_and_pickle():
    obs = _shard_observers(_data(120), 1, 32)[0]
    payload = to_wire({"layers": obs.state()["layers"], "n": np.int64(3), "f": np.float32(0.5)})
    for blob in (msgspec.msgpack.encode(payload), pickle.dumps(payload)):
        back = from_wire(msgspec.msgpack.decode(blob) if isinstance(blob, bytes) and blob[:1] != b"\x80"
                         else pickle.loads(blob))
        assert back["n"] == 3 and back["f"] == 0.5
        st = back["layers"][0]
        assert st["hist"].dtype == np.int32 and st["hist"].shape == (K, 2050)
        est = StreamingW1Estimator.from_state_dict(st)
        np.testing.assert_array_equal(est.finalize()["w1"], obs.finalize()["layers"][0]["w1"])


class FakeRuntime:
    def __init__(self, rank=0, size=1):
        self.observer = None
        self.tp_rank, self.tp_size = rank, size

    def state(self):
        return {"sets": {}, "default": None}


def test_worker_mixin_start_stop_collect():
    rt = FakeRuntime(1, 2)
    worker = DiscoveryWorkerMixin()
    set_runtime(rt)
    try:
        assert not worker.negablate_observe_collect()["ok"]  # nothing started
        r = worker.negablate_observe_start(json.dumps({"warmup_tokens": 64, "max_tokens": 20}))
        assert r["ok"] and r["active"] and r["tp_rank"] == 1 and r["tp_size"] == 2
        assert isinstance(rt.observer, PreactivationObserver)
        x = _data(30)
        rt.observer.observe(3, x, StepPlan(num_tokens=30))
        r = worker.negablate_observe_stop()
        assert r["ok"] and not r["active"] and rt.observer is None and r["tokens"] == {3: 20}
        c = worker.negablate_observe_collect()
        msgspec.msgpack.encode(c)  # what vLLM's engine core does with the reply
        c = from_wire(c)
        assert c["ok"] and c["layers"][3]["count"] == 20 and c["layers"][3]["buffer"].shape == (20, K)
        f = from_wire(worker.negablate_observe_collect(finalize=True, clear=True))
        np.testing.assert_allclose(f["layers"][3]["w1"], _exact_w1(x[:20].numpy()), atol=1e-9)
        assert not worker.negablate_observe_collect()["ok"]  # cleared
        bad = worker.negablate_observe_start(json.dumps({"nbins": "many"}))
        assert not bad["ok"] and "nbins" in bad["error"]
        assert worker.negablate_observe_start(json.dumps({"reset_peak_memory": True}))["memory"]["rss"] > 0
    finally:
        set_runtime(None)


# ------------------------------------------------------------------------ sets
FP = ModelFingerprint(architecture="Fake", num_layers=3, intermediate_size=200)


def _scores(seed=0):
    return np.random.default_rng(seed).gamma(2.0, size=(3, 200))


def test_wasserstein_and_control_sets():
    scores = _scores()
    w = wasserstein_set(scores, FP, 2.0, source={"corpus": "c"})
    assert w.name == "wasserstein-top2" and w.provenance.method == "wasserstein-top"
    for layer in range(3):
        ref = np.flatnonzero(scores[layer] > np.percentile(scores[layer], 98.0))
        assert w.layer_bounds(layer)[0] == ref.tolist() and len(ref) == 4  # K-1-floor(.98*(K-1))
    pos = mode_variant(w, "positive")
    assert pos.name == "wasserstein-top2-positive" and pos.entries[0].mode is AblationMode.POSITIVE
    r = random_control(w, seed=5)
    assert r.name == "random-top2-s5" and r.counts_per_layer() == w.counts_per_layer()
    for layer in range(3):
        assert not set(r.layer_bounds(layer)[0]) & set(w.layer_bounds(layer)[0])
    assert random_control(w, seed=5).content_hash() == r.content_hash()
    assert random_control(w, seed=6).content_hash() != r.content_hash()
    incl = random_control(w, seed=5, include_wasserstein=True)
    assert incl.name.endswith("-incl") and incl.provenance.source["exclude_base"] is False
    assert restrict_layers(w, [1]).name == "wasserstein-top2-layer1"
    first = restrict_layers(w, [0, 1])
    assert first.name == "wasserstein-top2-first2" and first.layers() == [0, 1]
    with pytest.raises(ValueError):
        restrict_layers(w, [7])


def test_fraction_sets_are_nested_and_exclude_base():
    w = wasserstein_set(_scores(), FP, 2.0)
    order = candidate_order(w, seed=1)
    assert all(len(v) == 196 for v in order.values())  # 200 - 4 Wasserstein neurons
    small = fraction_set(w, order, 0.1, "a")
    big = fraction_set(w, order, 0.3, "b")
    assert small.counts_per_layer() == {0: 20, 1: 20, 2: 19}  # 59 of 588, spread evenly
    assert big.num_neurons() == round(0.3 * 588)
    for layer in range(3):
        s, b = set(small.layer_bounds(layer)[0]), set(big.layer_bounds(layer)[0])
        assert s <= b and abs(len(b) - 0.3 * 196) < 1
        assert not b & set(w.layer_bounds(layer)[0])
        assert s == set(order[layer][: len(s)].tolist())  # a prefix of the layer's order
    # one more neuron in the whole model per step of 1/588
    assert fraction_set(w, order, 60 / 588, "c").num_neurons() == 60
    assert fraction_set(w, order, 1.0, "d").num_neurons() == 588
    assert fraction_set(w, order, 0.0, "e").num_neurons() == 0


def test_bottom_order_takes_the_lowest_w1_candidates_first():
    # the reference code's `bottom` control: per layer, the most Gaussian non-Wasserstein
    # neurons first, so every fraction is the layer's lowest-W1 candidates
    scores = _scores()
    w = wasserstein_set(scores, FP, 2.0)
    order = candidate_order(w, scores=scores)
    for layer, cand in order.items():
        assert len(cand) == 196 and not set(cand.tolist()) & set(w.layer_bounds(layer)[0])
        assert np.all(np.diff(scores[layer, cand]) >= 0)
        wset = set(w.layer_bounds(layer)[0])
        rest = np.array([n for n in range(200) if n not in wset])
        assert set(cand[:10].tolist()) == set(rest[np.argsort(scores[layer, rest])[:10]].tolist())
    ten = fraction_set(w, order, 0.1, "b", extra={"pool": "bottom"})
    assert ten.description.startswith("Lowest-W1 non-wasserstein-top2 neurons")
    assert ten.provenance.source["pool"] == "bottom"
    for layer in range(3):
        chosen = ten.layer_bounds(layer)[0]
        assert max(scores[layer, chosen]) <= min(np.delete(scores[layer], chosen + list(
            w.layer_bounds(layer)[0])))
    # deterministic: no seed involved
    assert candidate_order(w, seed=9, scores=scores)[0].tolist() == order[0].tolist()
    with pytest.raises(ValueError, match="scores have shape"):
        candidate_order(w, scores=scores[:2])


# ------------------------------------------------------------- bisection search
def test_perplexity_matched_converges_on_monotone_function():
    calls = []

    def ppl(f):
        calls.append(f)
        return 10.0 + 40.0 * f ** 2  # baseline 10 at f=0, 50 at f=1

    res = perplexity_matched(ppl, 30.0, None, tol=1e-3, max_iter=40)
    assert res.converged and abs(res.perplexity - 30.0) <= 0.03
    assert abs(res.fraction - np.sqrt(0.5)) < 1e-3
    assert res.iterations == len(calls) == len(res.history) and 3 <= res.iterations <= 20
    assert calls[:2] == [1.0, 0.0]  # bracket checked first


def test_perplexity_matched_limits():
    res = perplexity_matched(lambda f: 10 + f, 100.0, max_iter=5)
    assert not res.converged and "not reached" in res.reason and res.iterations == 1
    res = perplexity_matched(lambda f: 10 + 40 * f, 30.3, max_iter=4, tol=1e-6)
    assert not res.converged and res.reason == "max_iter" and res.iterations == 4
    # a step function: the bracket shrinks below one candidate (resolution 1/10)
    res = perplexity_matched(lambda f: 10 + 40 * np.floor(f * 10) / 10, 31.0, 10, tol=1e-3, max_iter=50)
    assert not res.converged and "narrower" in res.reason
    assert all(abs(f * 10 - round(f * 10)) < 1e-9 for f, _ in res.history)
    assert res.perplexity in (30.0, 34.0)
    res = perplexity_matched(lambda f: 30.0 + f, 30.0, tol=0.01)  # lo already matches
    assert res.converged and res.fraction == 0.0


def test_log_scale_search_from_the_wasserstein_size():
    # The Gemma case: the target needs ~1% of 18k candidates; linear bisection from [0, 1]
    # would spend its steps at 1, 0, 1/2, 1/4, ...
    n = 18_000

    def ppl(f):
        return 60.0 * (1.0 + 2.0 * f)  # +2% at f = 0.01

    calls = []
    res = perplexity_matched(lambda f: calls.append(f) or ppl(f), 61.2, n, tol=1e-3, max_iter=12,
                             start_frac=0.002)
    assert res.converged and abs(res.perplexity - 61.2) <= 61.2e-3 and abs(res.fraction - 0.01) < 6e-4
    assert calls[0] == 0.002 and calls[1] == 0.008 and calls[2] == 0.032  # x4 until bracketed
    assert all(abs(f * n - round(f * n)) < 1e-9 for f in calls)  # whole neurons only
    assert res.iterations <= 10
    # starting above the target: divide by 4 until below, then bisect
    calls.clear()
    res = perplexity_matched(lambda f: calls.append(f) or ppl(f), 61.2, n, tol=1e-3, max_iter=12,
                             start_frac=0.2)
    assert res.converged and calls[:3] == [0.2, 0.05, 0.0125] and calls[3] == round(0.003125 * n) / n
    # out of reach: one neuron already too much / everything not enough
    res = perplexity_matched(lambda f: 100.0, 61.2, n, start_frac=0.01)
    assert not res.converged and "one neuron" in res.reason
    res = perplexity_matched(lambda f: 60.0 + f, 62.0, n, start_frac=0.3, max_iter=20)
    assert not res.converged and "not reached" in res.reason and res.history[-1][0] == 1.0
    res = perplexity_matched(ppl, 61.2, n, start_frac=1e-4, max_iter=3, tol=1e-6)
    assert not res.converged and res.reason == "max_iter" and res.iterations == 3


# The standard preset's random-pool search on SmolLM2-135M (top 1%, 8,192 tokens): the
# (fraction, perplexity) points it measured, a monotone curve with a jump between 0.124
# and 0.130. Halving the bracket spent its 8 calls and stopped 1.2% above the target.
_RECORDED = [(0.010526, 31.1749), (0.042105, 31.7844), (0.084211, 32.2188), (0.119101, 33.4093),
             (0.124364, 33.4937), (0.129868, 34.6586), (0.141623, 35.2175), (0.168421, 36.0975)]


def _recorded_ppl(f):
    """Piecewise linear in log fraction through the recorded points."""
    xs, ys = np.log([a for a, _ in _RECORDED]), [b for _, b in _RECORDED]
    return float(np.interp(np.log(f), xs, ys))


def test_interpolation_matches_where_halving_ran_out():
    n, target = 45_600, 34.2559
    calls = []
    res = perplexity_matched(lambda f: calls.append(f) or _recorded_ppl(f), target, n, tol=0.01,
                             max_iter=8, start_frac=480 / n)
    assert res.converged and abs(res.perplexity - target) <= 0.01 * target
    assert 0.1264 < res.fraction < 0.1297  # where the curve crosses the tolerance band
    assert calls[:3] == [round(480 / n * n) / n, round(4 * 480) / n, round(16 * 480) / n]
    assert res.iterations <= 8 and res.iterations == len(calls)
    # each interpolated step stays inside the bracket of the steps before it
    lo, hi = calls[1], calls[2]
    for f in calls[3:]:
        assert lo < f < hi
        lo, hi = (f, hi) if _recorded_ppl(f) < target else (lo, f)


def test_interpolation_on_a_log_linear_curve_takes_two_steps():
    # perplexity exactly log-linear in log f: false position hits the root at once
    n = 100_000

    def ppl(f):
        return 30.0 * (f / 0.01) ** 0.05

    target = ppl(0.05)
    res = perplexity_matched(ppl, target, n, tol=1e-4, max_iter=20, start_frac=0.01)
    assert res.converged and abs(res.fraction - 0.05) < 2e-4
    assert res.iterations == 4  # 0.01, 0.04 (below), 0.16 (above), then the root


def test_windows_and_corpus(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text(" \n = A = \n \n b c \n")
    assert read_corpus_text(p) == "  = A = \n   b c \n"
    assert read_corpus_text(p, "\n\n") == "\n\n = A = \n\n\n\n\n b c \n"
    ids = list(range(10, 30))
    w = make_windows(ids, 8, 2)
    assert [len(x) for x in w] == [8, 8, 7] and all(x[0] == 2 for x in w)
    assert [t for x in w for t in x[1:]] == ids
    w = make_windows(ids, 8, 2, max_tokens=12)
    assert [len(x) for x in w] == [8, 4] and w[1] == [2, 17, 18, 19]
    w = make_windows(ids, 8, None, stride=4, max_tokens=100)
    assert w[1][0] == 14 and len(w[0]) == 8
    mask = top_percent_mask(np.arange(100.0), 5)
    assert mask.sum() == 5


def test_cli_constants_match_pipeline():
    from vllm_negablate import cli_neurons
    from vllm_negablate.discovery import corpus, pipeline

    for module, name in ((corpus, "DEFAULT_CORPUS"), (corpus, "DEFAULT_EVAL_CORPUS"),
                         (pipeline, "STATS_FILE"), (pipeline, "META_FILE"), (pipeline, "SETS_DIR")):
        assert getattr(cli_neurons, name) == getattr(module, name)
