"""NeuronSet schema: validation names the bad entry, hashing tracks content only."""

import json
import math

import pytest
from pydantic import ValidationError

from vllm_negablate.neuron_set import (
    AblationMode,
    IncompatibleNeuronSet,
    InvalidNeuronSetFile,
    LayerAblation,
    ModelFingerprint,
    NeuronSet,
)

FP = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=4, intermediate_size=16)


def make(entries, name="s", **kw):
    return NeuronSet(name=name, model=FP, entries=entries, **kw)


def test_mode_bounds():
    assert AblationMode.NEGATIVE.bounds == (0.0, math.inf)
    assert AblationMode.POSITIVE.bounds == (-math.inf, 0.0)
    assert AblationMode.BOTH.bounds == (0.0, 0.0)


def test_neurons_sorted_and_layer_bounds():
    ns = make([LayerAblation(layer=1, neurons=[5, 2], mode="positive"),
               LayerAblation(layer=1, neurons=[3], mode="both")])
    assert ns.layer_bounds(1) == ([2, 3, 5], [-math.inf, 0.0, -math.inf], [0.0, 0.0, 0.0])
    assert ns.layer_bounds(0) == ([], [], [])
    assert ns.counts_per_layer() == {1: 3}
    assert ns.num_neurons() == 3


@pytest.mark.parametrize(
    "entries, fragment",
    [
        ([{"layer": 4, "neurons": [0]}], "entries[0]: layer 4 is out of range"),
        ([{"layer": 0, "neurons": [16]}], "neuron index 16 is out of range"),
        ([{"layer": 0, "neurons": [-1]}], "must be >= 0"),
        ([{"layer": 0, "neurons": [1, 1]}], "duplicate neuron indices [1]"),
        ([{"layer": 2, "neurons": [1]}, {"layer": 2, "neurons": [1], "mode": "both"}],
         "entries[1] (layer 2): neurons [1] already appear"),
        ([{"layer": 0, "neurons": [1], "mode": "sideways"}], "mode"),
    ],
)
def test_validation_names_the_problem(entries, fragment):
    with pytest.raises(ValidationError) as info:
        NeuronSet.model_validate({"name": "s", "model": FP.model_dump(), "entries": entries})
    assert fragment in str(info.value)


@pytest.mark.parametrize("name", ["", "a@b", "a/b", "../x", "x y"])
def test_bad_names_rejected(name):
    with pytest.raises(ValidationError):
        make([], name=name)


def test_content_hash_ignores_name_and_provenance_but_not_neurons():
    a = make([LayerAblation(layer=0, neurons=[1, 2])], name="a")
    b = make([LayerAblation(layer=0, neurons=[2, 1])], name="b", description="other")
    c = make([LayerAblation(layer=0, neurons=[1, 3])], name="a")
    d = make([LayerAblation(layer=0, neurons=[1, 2], mode="positive")], name="a")
    assert a.content_hash() == b.content_hash()
    assert len({a.content_hash(), c.content_hash(), d.content_hash()}) == 3


def test_compatibility_check_names_the_mismatch():
    ns = make([])
    ns.check_compatible(FP)
    other = ModelFingerprint(architecture="LlamaForCausalLM", num_layers=4, intermediate_size=32)
    with pytest.raises(IncompatibleNeuronSet, match="intermediate_size: set has 16, model has 32"):
        ns.check_compatible(other)


def test_save_load_roundtrip_and_bad_file(tmp_path):
    ns = make([LayerAblation(layer=3, neurons=[0, 15], mode="both")])
    path = ns.save(tmp_path / "s.json")
    assert NeuronSet.load(path) == ns
    assert not list(tmp_path.glob(".*.tmp"))
    (tmp_path / "bad.json").write_text(path.read_text()[:-20])
    with pytest.raises(InvalidNeuronSetFile, match="bad.json"):
        NeuronSet.load(tmp_path / "bad.json")
    data = json.loads(path.read_text())
    data["schema_version"] = 99
    (tmp_path / "v99.json").write_text(json.dumps(data))
    with pytest.raises(InvalidNeuronSetFile, match="unsupported schema_version 99"):
        NeuronSet.load(tmp_path / "v99.json")
