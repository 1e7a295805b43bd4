"""The oracle test: ablations served by real vLLM equal transformers + hooks.

One eager engine per tiny model (GPT-NeoX/GELU via vLLM's Transformers backend,
Llama/SiLU, Gemma 3/GeGLU-tanh), float32, prefix caching on. Every comparison
also checks that the ablation moved the log-probs, so a plugin that did
nothing would fail.
"""

from __future__ import annotations

import json
import math

import pytest

from vllm_negablate.neuron_set import NeuronSetError
from vllm_negablate.offline import (
    ablation_state,
    load_neuron_set,
    sampling_params,
    score_prompts,
    set_default_neuron_set,
    unload_neuron_set,
)
from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import make_llm, max_diff, random_prompts, shutdown
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow

TOL = 2e-4


def prompts(n=3, length=40, seed=0):
    return random_prompts(n, length, seed)


@pytest.fixture(scope="module", params=["gpt_neox", "llama", "gemma3"])
def engine(request, tiny_models):
    model_dir = tiny_models[request.param]
    llm = make_llm(model_dir)
    oracle = HFAblationOracle(model_dir)
    yield request.param, model_dir, llm, oracle
    shutdown(llm)


def test_each_mode_matches_the_transformers_oracle(engine):
    kind, model_dir, llm, oracle = engine
    texts = prompts()
    base = score_prompts(llm, texts)
    for t, row in zip(texts, base):
        assert max_diff(row, oracle.prompt_logprobs(t)) < TOL
    for mode in ("negative", "positive", "both"):
        ns = random_set(model_dir, f"{kind}-{mode}", mode)
        load_neuron_set(llm, ns)
        got = score_prompts(llm, texts, neuron_set=ns.name)
        for t, row, plain in zip(texts, got, base):
            ref = oracle.prompt_logprobs(t, ns)
            assert max_diff(row, ref) < TOL, (kind, mode)
            assert max_diff(row, plain) > 1e-3, (kind, mode, "ablation had no effect")


def test_mixed_batch_equals_requests_alone(engine):
    kind, model_dir, llm, oracle = engine
    a = random_set(model_dir, "mixA", "negative", seed=1)
    b = random_set(model_dir, "mixB", "both", seed=2)
    load_neuron_set(llm, a)
    load_neuron_set(llm, b)
    text = prompts(1, seed=5)[0]
    alone = [score_prompts(llm, [text], neuron_set=n)[0] for n in (None, "mixA", "mixB")]
    mixed = score_prompts(llm, [text] * 3, neuron_set=[None, "mixA", "mixB"])
    for x, y in zip(alone, mixed):
        assert max_diff(x, y) < 1e-5
    assert max_diff(mixed[1], oracle.prompt_logprobs(text, a)) < TOL
    assert max_diff(mixed[2], oracle.prompt_logprobs(text, b)) < TOL
    assert max_diff(mixed[0], mixed[1]) > 1e-3 and max_diff(mixed[1], mixed[2]) > 1e-3


def test_prefix_cache_never_crosses_neuron_sets(engine):
    """Generation requests read the prefix cache (prompt-logprob requests never do).

    Each request generates one token greedily with its logprob; that logprob
    is log p(next | prompt), computed from the cached prefix when one is hit.
    """
    kind, model_dir, llm, oracle = engine
    a = random_set(model_dir, "cacheA", "negative", seed=3)
    b = random_set(model_dir, "cacheB", "negative", seed=4)
    load_neuron_set(llm, a)
    load_neuron_set(llm, b)
    text = prompts(1, length=300, seed=9)[0]  # 2 full KV blocks (CPU block size is 128)

    def run(name):
        params = sampling_params(name, max_tokens=1, temperature=0.0, logprobs=0, detokenize=False)
        out = llm.generate([{"prompt_token_ids": text}], params, use_tqdm=False)[0]
        token = out.outputs[0].token_ids[0]
        return token, out.outputs[0].logprobs[0][token].logprob, out.num_cached_tokens or 0

    def expected(token, ns):
        return oracle.prompt_logprobs(text + [token], ns)[-1]

    tok_a, lp_a, _ = run("cacheA")
    tok_a2, lp_a2, cached_a = run("cacheA")
    tok_b, lp_b, cached_b = run("cacheB")
    tok_n, lp_n, cached_n = run(None)
    assert cached_a >= 256, "prefix caching is not active: the test would prove nothing"
    assert cached_b == 0 and cached_n == 0
    assert (tok_a2, abs(lp_a2 - lp_a) < 1e-5) == (tok_a, True)
    assert abs(lp_a - expected(tok_a, a)) < TOL
    assert abs(lp_b - expected(tok_b, b)) < TOL
    assert abs(lp_n - expected(tok_n, None)) < TOL
    # and the reverse order: none first, then a set, hits no stale block either
    tok_b2, lp_b2, cached_b2 = run("cacheB")
    assert cached_b2 >= 256 and tok_b2 == tok_b and abs(lp_b2 - lp_b) < 1e-5


def test_default_set_applies_to_requests_that_name_none(engine):
    kind, model_dir, llm, oracle = engine
    ns = random_set(model_dir, "dflt", "negative", seed=6)
    load_neuron_set(llm, ns)
    text = prompts(1, seed=11)[0]
    state = set_default_neuron_set(llm, "dflt")
    assert state["default"] == "dflt"
    assert max_diff(score_prompts(llm, [text])[0], oracle.prompt_logprobs(text, ns)) < TOL
    # "none" is the unablated model whatever the default (plain vLLM: vllm_xargs / extra_args)
    mixed = score_prompts(llm, [text] * 2, neuron_set=["none", None])
    assert max_diff(mixed[0], oracle.prompt_logprobs(text)) < TOL
    assert max_diff(mixed[1], oracle.prompt_logprobs(text, ns)) < TOL
    set_default_neuron_set(llm, None)
    assert max_diff(score_prompts(llm, [text])[0], oracle.prompt_logprobs(text)) < TOL


def test_bad_sets_are_rejected_and_leave_state_unchanged(engine):
    kind, model_dir, llm, oracle = engine
    good = random_set(model_dir, "keep", "negative", seed=7)
    load_neuron_set(llm, good)
    before = ablation_state(llm)
    width = good.model.intermediate_size
    raw = json.loads(good.model_dump_json())
    raw["entries"][0]["neurons"] = [0, width]  # out of range
    replies = llm.collective_rpc("negablate_load_set", args=(json.dumps(raw),))
    assert not replies[0]["ok"]
    assert f"neuron index {width} is out of range" in replies[0]["error"]
    other_shape = good.model_copy(update={"name": "keep", "model": good.model.model_copy(
        update={"num_layers": good.model.num_layers + 1})})
    with pytest.raises(NeuronSetError, match="num_layers: set has"):
        load_neuron_set(llm, other_shape)
    with pytest.raises(NeuronSetError, match="unknown neuron set 'nope'"):
        set_default_neuron_set(llm, "nope")
    with pytest.raises(NeuronSetError, match="unknown neuron set 'nope'"):
        unload_neuron_set(llm, "nope")
    assert ablation_state(llm) == before
    text = prompts(1, seed=12)[0]
    assert max_diff(score_prompts(llm, [text], "keep")[0], oracle.prompt_logprobs(text, good)) < TOL


def test_unknown_set_gives_nan_not_a_silent_unablated_answer(engine):
    kind, model_dir, llm, oracle = engine
    text = prompts(1, seed=13)[0]
    row = score_prompts(llm, [text], neuron_set="never-loaded")[0]
    assert all(math.isnan(x) for x in row[1:])
