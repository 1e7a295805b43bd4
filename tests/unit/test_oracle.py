"""The HF ablation oracle against hand-written references, on tiny random models.

The oracle hooks the *activation* module's input; the references here hook
something else (the projection's output, or the whole MLP's output), so an
error in either placement shows up as a mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vllm_negablate.neuron_set import (
    AblationMode,
    IncompatibleNeuronSet,
    LayerAblation,
    NeuronSet,
)
from vllm_negablate.ops import clamp_pre_activation_native, full_width_bounds
from vllm_negablate.oracle import (
    HFAblationOracle,
    UnsupportedArchitecture,
    find_activation_modules,
)
from vllm_negablate.testing.tiny_models import (
    BOS_ID,
    EOS_ID,
    KINDS,
    MARKER_NAME,
    PAD_ID,
    build_tiny_model,
    fingerprint_of,
    intermediate_size_of,
)

TEXTS = [
    "The keys to the cabinet are on the table.",
    "The authors that the guard likes have left, and the senator who met them is tired.",
]
EXPECTED = {
    "gpt_neox": ("GPTNeoXForCausalLM", 256),
    "llama": ("LlamaForCausalLM", 128),
    "gemma3": ("Gemma3ForCausalLM", 128),
}


# ----------------------------------------------------------------------- helpers
def count_hooks(modules) -> int:
    """Forward-pre-hooks left on the activation modules (the oracle must remove its own)."""
    return sum(len(m._forward_pre_hooks) for m in modules.values())


# ----------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: build_tiny_model(kind, root / kind) for kind in KINDS}


@pytest.fixture(scope="module", params=KINDS)
def kind(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def oracle(kind, tiny_dirs) -> HFAblationOracle:
    return HFAblationOracle(tiny_dirs[kind])


@pytest.fixture(scope="module")
def prompts(kind, tiny_dirs) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dirs[kind])
    return [[BOS_ID] + tok(t)["input_ids"] for t in TEXTS]


def make_set(oracle: HFAblationOracle, entries: list[tuple[int, list[int], str]]) -> NeuronSet:
    return NeuronSet(
        name="test-set",
        model=oracle.fingerprint(),
        entries=[LayerAblation(layer=l, neurons=n, mode=AblationMode(m)) for l, n, m in entries],
    )


def layers_of(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "gpt_neox", None) or model.model
    return list(base.layers)


def projection(mlp: nn.Module) -> nn.Module:
    """The linear layer whose output is the pre-activation (gate for gated MLPs)."""
    return mlp.gate_proj if hasattr(mlp, "gate_proj") else mlp.dense_h_to_4h


def down_projection(mlp: nn.Module) -> nn.Module:
    return mlp.down_proj if hasattr(mlp, "down_proj") else mlp.dense_4h_to_h


def plain_logprobs(model: nn.Module, ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    lp = torch.log_softmax(logits.float(), dim=-1)
    return [lp[t - 1, ids[t]].item() for t in range(1, len(ids))]


def max_diff(a: list[float | None], b: list[float | None]) -> float:
    assert len(a) == len(b)
    assert a[0] is None and b[0] is None
    return max(abs(x - y) for x, y in zip(a[1:], b[1:]))


def reference_by_projection_hooks(oracle, ids, neuron_set: NeuronSet) -> list[float | None]:
    """Clamp the projection *output* (not the activation input) with the native reference."""
    handles = []
    layers = layers_of(oracle.model)
    width = oracle.fingerprint().intermediate_size
    for layer in neuron_set.layers():
        lo, hi = full_width_bounds(width, *neuron_set.layer_bounds(layer))

        def hook(module, args, out, lo=lo, hi=hi):
            return clamp_pre_activation_native(out, lo, hi)

        handles.append(projection(layers[layer].mlp).register_forward_hook(hook))
    try:
        return [None, *plain_logprobs(oracle.model, ids)]
    finally:
        for h in handles:
            h.remove()


# -------------------------------------------------------------------------- tests
def test_tiny_model_metadata(kind, tiny_dirs):
    from transformers import AutoConfig, AutoTokenizer

    d = tiny_dirs[kind]
    arch, width = EXPECTED[kind]
    fp = fingerprint_of(d)
    assert (fp.architecture, fp.num_layers, fp.intermediate_size) == (arch, 2, width)
    assert intermediate_size_of(d) == width
    cfg = AutoConfig.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    assert cfg.vocab_size == len(tok) == 512
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)
    ids = tok("The cat sat on the mat.")["input_ids"]
    assert ids and BOS_ID not in ids and EOS_ID not in ids  # no implicit specials
    assert cfg.hidden_size == 64 and cfg.num_attention_heads == 2
    assert json.loads((d / "config.json").read_text())["rope_theta"] > 0


def test_build_is_cached_and_deterministic(tiny_dirs, tmp_path):
    d = tiny_dirs["llama"]
    before = (d / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model("llama", d) == d
    assert (d / "model.safetensors").stat().st_mtime_ns == before  # reused, not rebuilt
    again = build_tiny_model("llama", tmp_path / "same")
    assert (again / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    other = build_tiny_model("llama", tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (d / "model.safetensors").read_bytes()
    # A different request into an existing dir rebuilds it (marker mismatch).
    build_tiny_model("llama", tmp_path / "same", seed=1)
    assert json.loads((tmp_path / "same" / MARKER_NAME).read_text())["seed"] == 1


def test_fingerprint(oracle, kind, tiny_dirs):
    assert oracle.fingerprint() == fingerprint_of(tiny_dirs[kind])
    assert sorted(oracle.act_modules) == [0, 1]


def test_no_set_equals_plain_forward(oracle, prompts):  # (a)
    for ids in prompts:
        got = oracle.prompt_logprobs(ids)
        assert len(got) == len(ids) and got[0] is None
        ref = plain_logprobs(oracle.model, ids)
        assert got[1:] == pytest.approx(ref, abs=1e-6)
        assert all(x < 0 for x in got[1:])
    assert oracle.prompt_logprobs([]) == []
    assert oracle.prompt_logprobs([BOS_ID]) == [None]


@pytest.mark.parametrize(
    "entries",
    [
        [(0, [1, 5, 9, 17, 33, 64, 100], "negative")],
        [(1, [0, 2, 4, 8, 16, 32], "negative")],
        # mixed modes in one layer and across layers
        [(0, [3, 7, 11], "negative"), (0, [12, 13], "positive"), (1, [4, 6], "both"),
         (1, list(range(40, 70)), "negative")],
    ],
    ids=["neg-layer0", "neg-layer1", "mixed"],
)
def test_clamp_equals_projection_hook(oracle, prompts, entries):  # (b)
    ns = make_set(oracle, entries)
    for ids in prompts:
        base = oracle.prompt_logprobs(ids)
        got = oracle.prompt_logprobs(ids, ns)
        ref = reference_by_projection_hooks(oracle, ids, ns)
        assert max_diff(got, ref) < 1e-5
        assert max_diff(got, base) > 1e-4  # the ablation really did something


def test_empty_set_is_identity(oracle, prompts):  # (c)
    empty = make_set(oracle, [])
    empty_entry = make_set(oracle, [(0, [], "both")])
    for ids in prompts:
        base = oracle.prompt_logprobs(ids)
        assert oracle.prompt_logprobs(ids, empty) == base
        assert oracle.prompt_logprobs(ids, empty_entry) == base
    assert count_hooks(oracle.act_modules) == 0


def test_both_on_whole_layer(oracle, prompts):  # (d)
    width = oracle.fingerprint().intermediate_size
    both = make_set(oracle, [(0, list(range(width)), "both")])
    neg = make_set(oracle, [(0, list(range(width)), "negative")])
    mlp0 = layers_of(oracle.model)[0].mlp

    # Independent reference: act(0) = 0 for every neuron, so the MLP outputs down_proj(0)
    # (zero for bias-free gated MLPs, the output bias for GPT-NeoX).
    def zero_mlp(module, args, out):
        zeros = torch.zeros(*out.shape[:-1], width, dtype=out.dtype)
        return down_projection(mlp0)(zeros)

    for ids in prompts:
        base = oracle.prompt_logprobs(ids)
        got_both = oracle.prompt_logprobs(ids, both)
        got_neg = oracle.prompt_logprobs(ids, neg)
        assert max_diff(got_both, base) > 1e-2
        assert max_diff(got_both, got_neg) > 1e-2
        handle = mlp0.register_forward_hook(zero_mlp)
        try:
            ref = [None, *plain_logprobs(oracle.model, ids)]
        finally:
            handle.remove()
        assert max_diff(got_both, ref) < 1e-5


def test_hooks_removed_even_on_exception(oracle, prompts):  # (e)
    ns = make_set(oracle, [(0, [1, 2, 3], "both"), (1, [4], "negative")])
    ids = prompts[0]
    base = oracle.prompt_logprobs(ids)
    assert count_hooks(oracle.act_modules) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with oracle.ablated(ns):
            assert count_hooks(oracle.act_modules) == 2
            raise RuntimeError("boom")
    assert count_hooks(oracle.act_modules) == 0
    assert oracle.prompt_logprobs(ids) == base
    oracle.prompt_logprobs(ids, ns)
    assert count_hooks(oracle.act_modules) == 0


def test_incompatible_set_is_refused(oracle, kind, tiny_dirs):
    other = "llama" if kind != "llama" else "gpt_neox"
    ns = NeuronSet(name="other", model=fingerprint_of(tiny_dirs[other]),
                   entries=[LayerAblation(layer=0, neurons=[0])])
    with pytest.raises(IncompatibleNeuronSet):
        oracle.prompt_logprobs([BOS_ID, 10, 11], ns)
    assert count_hooks(oracle.act_modules) == 0


def test_batch_equals_single(oracle, prompts):
    ns = make_set(oracle, [(1, [0, 1, 2, 3, 4, 5, 6, 7], "negative")])
    batch = [*prompts, prompts[0][:3]]
    for s in (None, ns):
        got = oracle.batch_prompt_logprobs(batch, s)
        assert got == [oracle.prompt_logprobs(ids, s) for ids in batch]


def test_capture_preactivations(oracle, prompts):  # (f)
    ids = prompts[1]
    width = oracle.fingerprint().intermediate_size
    layers = layers_of(oracle.model)
    seen: dict[int, torch.Tensor] = {}
    handles = [
        projection(layer.mlp).register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(i, out[0].detach().clone()))
        for i, layer in enumerate(layers)
    ]
    try:
        caps = oracle.capture_preactivations(ids)
    finally:
        for h in handles:
            h.remove()
    assert sorted(caps) == [0, 1]
    for i, cap in caps.items():
        assert cap.shape == (len(ids), width) and cap.dtype == torch.float32
        assert torch.equal(cap, seen[i])
        assert (cap < 0).any() and (cap > 0).any()
    # Under a set: each layer is recorded before its own clamp, after earlier layers' clamps.
    ns = make_set(oracle, [(0, list(range(width)), "both")])
    ablated = oracle.capture_preactivations(ids, ns)
    assert torch.equal(ablated[0], caps[0])
    assert not torch.allclose(ablated[1], caps[1])
    assert oracle.capture_preactivations(ids, layers=[1]).keys() == {1}
    assert count_hooks(oracle.act_modules) == 0


def test_find_activation_modules_gpt2_and_unsupported():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                      n_positions=32))
    acts = find_activation_modules(gpt2)
    assert sorted(acts) == [0, 1]
    assert all(acts[i] is gpt2.transformer.h[i].mlp.act for i in acts)

    class NotALM(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedArchitecture, match="decoder layers"):
        find_activation_modules(NotALM())
