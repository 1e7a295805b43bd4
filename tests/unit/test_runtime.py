"""The ablation op, its tables and the per-worker runtime, without vLLM.

A fake model with vLLM's MLP layout (fused gate_up projection exposing
``output_size_per_partition``, an ``...AndMul`` activation) lets us check the
op against the native clamp reference (``clamp_pre_activation_native``), simulate tensor parallelism by splitting weights
across ranks, and exercise request pinning and slot recycling.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vllm_negablate.context import set_runtime
from vllm_negablate.neuron_set import LayerAblation, ModelFingerprint, NeuronSet, NeuronSetError
from vllm_negablate.ops import (
    SignAblatedActivation,
    ablate_dense_,
    ablate_sparse_,
    clamp_pre_activation_native,
    full_width_bounds,
)
from vllm_negablate.runtime import NEURON_SET_HASH_KEY, NEURON_SET_KEY, WorkerRuntime
from vllm_negablate.sharding import ShardSpec, pipeline_layer_range
from vllm_negablate.step_plan import StepPlan
from vllm_negablate.tables import AblationTables
from vllm_negablate.testing.fake_model import FakeModel, SiluAndMul

HIDDEN, WIDTH, LAYERS = 8, 12, 3
FP = ModelFingerprint(architecture="Fake", num_layers=LAYERS, intermediate_size=WIDTH)


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(WIDTH, HIDDEN, generator=g), torch.randn(WIDTH, HIDDEN, generator=g))
            for _ in range(LAYERS)]


@pytest.fixture(autouse=True)
def _unbind():
    yield
    set_runtime(None)


def reference(weights, x, neuron_set: NeuronSet | None):
    """Direct computation: the gate (MLP pre-activation) through the native clamp reference."""
    out = {}
    for layer, (wg, wu) in enumerate(weights):
        gate = x @ wg.T
        if neuron_set is not None:
            lo, hi = full_width_bounds(WIDTH, *neuron_set.layer_bounds(layer))
            gate = clamp_pre_activation_native(gate, lo, hi)
        out[layer] = F.silu(gate) * (x @ wu.T)
    return out


SET_A = NeuronSet(name="A", model=FP, entries=[
    LayerAblation(layer=0, neurons=[0, 3, 5, 6, 11], mode="negative"),
    LayerAblation(layer=1, neurons=[1, 2], mode="positive"),
    LayerAblation(layer=2, neurons=[4, 7, 8], mode="both"),
])
SET_B = NeuronSet(name="B", model=FP, entries=[LayerAblation(layer=1, neurons=list(range(WIDTH)))])


def runtime_for(model, tp_rank=0, tp_size=1, kernel="sparse", max_sets=4):
    rt = WorkerRuntime.for_model(model, FP, tp_rank=tp_rank, tp_size=tp_size,
                                 kernel=kernel, max_sets=max_sets, max_num_tokens=64)
    set_runtime(rt)
    return rt


def step(rt, layout, args):
    """layout: [(req_id, n_tokens)], args: {req_id: extra_args}"""
    return rt.begin_step([r for r, _ in layout], dict(layout), args)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_uniform_and_mixed_batches_match_reference(weights, kernel):
    model = FakeModel(weights)
    rt = runtime_for(model, kernel=kernel)
    assert [type(l.mlp.act_fn) for l in model.layers.values()] == [SignAblatedActivation] * 3
    rt.load_set(SET_A)
    rt.load_set(SET_B)
    x = torch.randn(9, HIDDEN, generator=torch.Generator().manual_seed(1))

    step(rt, [("r0", 9)], {})
    plain = model(x)
    for layer, ref in reference(weights, x, None).items():
        torch.testing.assert_close(plain[layer], ref, rtol=1e-5, atol=1e-5)

    step(rt, [("u", 9)], {"u": {NEURON_SET_KEY: "A"}})
    assert rt.plan.uniform_slot == rt.slots[SET_A.content_hash()].slot
    ablated = model(x)
    for layer, ref in reference(weights, x, SET_A).items():
        torch.testing.assert_close(ablated[layer], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ablated[0], plain[0])

    # mixed: none (2 tokens), A (3), B (4) in one step
    step(rt, [("n", 2), ("a", 3), ("b", 4)],
         {"a": {NEURON_SET_KEY: "A"}, "b": {NEURON_SET_KEY: "B"}})
    mixed = model(x)
    ref_none, ref_a, ref_b = (reference(weights, x, s) for s in (None, SET_A, SET_B))
    for layer in range(LAYERS):
        torch.testing.assert_close(mixed[layer][:2], ref_none[layer][:2], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[layer][2:5], ref_a[layer][2:5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[layer][5:], ref_b[layer][5:], rtol=1e-5, atol=1e-5)

    rt.end_step()
    torch.testing.assert_close(model(x)[1], plain[1], rtol=0, atol=0)  # no plan: untouched


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tensor_parallel_shards_reassemble_to_the_unsharded_result(weights, tp_size):
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(2))
    expected = reference(weights, x, SET_A)
    pieces = {layer: [] for layer in range(LAYERS)}
    local_counts = 0
    for rank in range(tp_size):
        model = FakeModel(weights, rank, tp_size)
        rt = runtime_for(model, rank, tp_size)
        state = rt.load_set(SET_A)
        local_counts += state["sets"]["A"]["local_neurons"]
        step(rt, [("r", 5)], {"r": {NEURON_SET_KEY: "A"}})
        for layer, out in model(x).items():
            pieces[layer].append(out)
    assert local_counts == SET_A.num_neurons()  # every neuron owned by exactly one rank
    for layer in range(LAYERS):
        torch.testing.assert_close(torch.cat(pieces[layer], dim=1), expected[layer], rtol=1e-5, atol=1e-5)


def test_shard_spec_localizes_and_rejects_uneven_split():
    spec = ShardSpec(tp_rank=1, tp_size=2, global_width=12)
    assert (spec.start, spec.stop) == (6, 12)
    assert spec.localize([0, 6, 11], [0.0, 0.0, 1.0], [9.0, 9.0, 9.0]) == ([0, 5], [0.0, 1.0], [9.0, 9.0])
    with pytest.raises(ValueError, match="not divisible"):
        ShardSpec(tp_rank=0, tp_size=5, global_width=12)


@pytest.mark.parametrize("pp_size", [1, 2, 3])
def test_pipeline_stages_own_disjoint_layers_with_global_indices(weights, pp_size):
    owners = []
    x = torch.randn(4, HIDDEN)
    expected = reference(weights, x, SET_A)
    for rank in range(pp_size):
        layers = pipeline_layer_range(LAYERS, rank, pp_size)
        model = FakeModel(weights, layers=layers)
        rt = runtime_for(model)
        rt.load_set(SET_A)
        owners.extend(rt.tables.layers)
        step(rt, [("r", 4)], {"r": {NEURON_SET_KEY: "A"}})
        for layer, out in model(x).items():
            torch.testing.assert_close(out, expected[layer], rtol=1e-5, atol=1e-5)
    assert sorted(owners) == list(range(LAYERS))


def test_step_plan_runs_merge_and_skip_unablated():
    plan = StepPlan.build(["a", "b", "c", "d", "e"], {"a": 2, "b": 3, "c": 1, "d": 0, "e": 4},
                          {"a": 1, "b": 1, "c": 0, "e": 2})
    assert plan.runs == ((1, 0, 5), (2, 6, 10))
    assert plan.num_tokens == 10 and plan.uniform_slot is None
    assert StepPlan.build(["a"], {"a": 3}, {}).is_noop
    buf = torch.full((12,), 7)
    plan.fill_slot_buffer(buf)
    assert buf.tolist() == [1] * 5 + [0] + [2] * 4 + [0, 0]


def test_requests_keep_their_slot_when_the_set_is_replaced_or_default_changes(weights):
    model = FakeModel(weights)
    rt = runtime_for(model)
    rt.load_set(SET_A)
    rt.set_default("A")
    step(rt, [("old", 3)], {"old": {}})  # admitted under default A
    slot_a = rt.request_slots["old"]
    # replace A's content under the same name, and drop the default
    replaced = SET_B.model_copy(update={"name": "A"})
    rt.load_set(replaced)
    rt.set_default(None)
    assert rt.slots[replaced.content_hash()].slot != slot_a  # new content, new slot
    step(rt, [("old", 1), ("new", 2)], {"new": {}})
    assert rt.request_slots["old"] == slot_a  # in flight: unchanged
    assert rt.request_slots["new"] == 0
    # the old content's slot is recycled only after its request finishes
    assert SET_A.content_hash() in rt.slots
    rt.begin_step([], {}, {}, finished_req_ids=["old", "new"])
    rt.load_set(SET_B.model_copy(update={"name": "C"}))
    assert SET_A.content_hash() not in rt.slots


def test_pinned_hash_and_unknown_sets(weights):
    model = FakeModel(weights)
    rt = runtime_for(model)
    rt.load_set(SET_A)
    x = torch.randn(2, HIDDEN)
    step(rt, [("h", 1), ("gone", 1)], {
        "h": {NEURON_SET_KEY: "A", NEURON_SET_HASH_KEY: SET_A.content_hash()},
        "gone": {NEURON_SET_KEY: "A", NEURON_SET_HASH_KEY: "feedfacefeedface"},
    })
    assert rt.request_slots["h"] == rt.slots[SET_A.content_hash()].slot
    assert rt.request_slots["gone"] == rt.tables.poison_slot
    out = model(x)
    assert torch.isfinite(out[0][0]).all() and torch.isnan(out[0][1]).all()
    step(rt, [("n", 1)], {"n": {NEURON_SET_KEY: "nope"}})
    assert rt.request_slots["n"] == rt.tables.poison_slot


def test_bad_sets_are_rejected_and_change_nothing(weights):
    model = FakeModel(weights)
    rt = runtime_for(model, max_sets=2)
    rt.load_set(SET_A)
    before = rt.state()
    lo_before = {l: t.lo.clone() for l, t in rt.tables.layers.items()}
    wrong_shape = NeuronSet(name="W", model=FP.model_copy(update={"intermediate_size": 24}))
    with pytest.raises(NeuronSetError, match="intermediate_size: set has 24, model has 12"):
        rt.load_set(wrong_shape)
    with pytest.raises(NeuronSetError, match="unknown neuron set 'zzz'"):
        rt.set_default("zzz")
    with pytest.raises(NeuronSetError, match="unknown neuron set 'zzz'"):
        rt.unload_set("zzz")
    rt.load_set(SET_B)
    with pytest.raises(NeuronSetError, match="all 2 neuron-set slots are in use"):
        rt.load_set(SET_B.model_copy(update={"name": "C", "entries": SET_A.entries[:1]}))
    rt.unload_set("B")
    assert rt.state() == before
    for layer, table in rt.tables.layers.items():
        torch.testing.assert_close(table.lo, lo_before[layer], equal_nan=True, rtol=0, atol=0)


def test_wrapping_is_idempotent_and_poison_slot_is_nan(weights):
    model = FakeModel(weights)
    rt = runtime_for(model)
    again = WorkerRuntime.for_model(model, FP, max_num_tokens=8)
    assert len(again.layers) == len(rt.layers) == LAYERS
    assert isinstance(model.layers["0"].mlp.act_fn.inner, SiluAndMul)
    poison = rt.tables.layers[0].lo[rt.tables.poison_slot]
    assert all(math.isnan(v) for v in poison.tolist())


def test_none_selector_is_unablated_whatever_the_default(weights):
    model = FakeModel(weights)
    rt = runtime_for(model)
    rt.load_set(SET_A)
    rt.set_default("A")
    step(rt, [("d", 1), ("n", 1)], {"d": {}, "n": {NEURON_SET_KEY: "none"}})
    assert rt.request_slots["d"] == rt.slots[SET_A.content_hash()].slot
    assert rt.request_slots["n"] == 0  # the no-ablation slot


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_and_dense_kernels_equal_the_native_reference(dtype):
    """Both kernels, on one mixed step (none / A / B / poison), bit for bit."""
    tables = AblationTables({layer: ShardSpec(0, 1, WIDTH) for layer in range(LAYERS)}, 2, dtype)
    tables.write_set(1, SET_A)
    tables.write_set(2, SET_B)
    poison = tables.poison_slot
    plan = StepPlan.build(["n", "a", "b", "p"], {"n": 2, "a": 3, "b": 4, "p": 1},
                          {"n": 0, "a": 1, "b": 2, "p": poison})
    slot_ids = torch.zeros(16, dtype=torch.long)
    plan.fill_slot_buffer(slot_ids)
    nan_row = torch.full((WIDTH,), math.nan)
    bounds = {0: full_width_bounds(WIDTH, [], [], []), poison: (nan_row, nan_row)}
    h0 = torch.randn(plan.num_tokens, WIDTH, generator=torch.Generator().manual_seed(3)).to(dtype)
    for layer, table in tables.layers.items():
        bounds[1] = full_width_bounds(WIDTH, *SET_A.layer_bounds(layer))
        bounds[2] = full_width_bounds(WIDTH, *SET_B.layer_bounds(layer))
        slots = slot_ids[: plan.num_tokens].tolist()
        lo = torch.stack([bounds[s][0] for s in slots])
        hi = torch.stack([bounds[s][1] for s in slots])
        expected = clamp_pre_activation_native(h0, lo, hi)
        sparse, dense = h0.clone(), h0.clone()
        ablate_sparse_(sparse, table, plan.runs)
        ablate_dense_(dense, table, slot_ids)
        torch.testing.assert_close(sparse, expected, rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(dense, expected, rtol=0, atol=0, equal_nan=True)
        assert torch.isnan(expected[-1]).all() and not torch.isnan(expected[:-1]).any()
