"""The same oracle check under vLLM's default compilation and under TP=2.

Compiled mode: the op is a registered custom op, so Dynamo/Inductor keep it
opaque and its Python body (reading the step plan) runs every step.
TP=2 runs for real on 2 CPU cores (one OpenMP thread per rank): each rank
holds half of every layer's table.
"""

from __future__ import annotations

import pytest

from vllm_negablate.offline import load_neuron_set, score_prompts
from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import TOL, make_llm, max_diff, shutdown
from vllm_negablate.testing.engines import random_prompts as prompts
from vllm_negablate.testing.sets import random_set

pytestmark = pytest.mark.slow


def check_engine(llm, model_dir, state_check=None):
    oracle = HFAblationOracle(model_dir)
    a = random_set(model_dir, "A", "negative", seed=21)
    b = random_set(model_dir, "B", "positive", seed=22)
    state = load_neuron_set(llm, a)
    load_neuron_set(llm, b)
    if state_check:
        state_check(state)
    texts = prompts(2, seed=31)
    got = score_prompts(llm, texts * 3, neuron_set=[None, None, "A", "A", "B", "B"])
    for i, ns in enumerate([None, a, b]):
        for j, t in enumerate(texts):
            assert max_diff(got[2 * i + j], oracle.prompt_logprobs(t, ns)) < TOL
    assert max_diff(got[0], got[2]) > 1e-3


def test_default_compilation_matches_oracle(tiny_models):
    llm = make_llm(tiny_models["llama"], enforce_eager=False)
    try:
        assert llm.llm_engine.vllm_config.compilation_config.mode != 0  # really compiled
        check_engine(llm, tiny_models["llama"])
    finally:
        shutdown(llm)


def test_tensor_parallel_2_matches_oracle(tiny_models, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = make_llm(tiny_models["gemma3"], tensor_parallel_size=2, distributed_executor_backend="mp")

    def sharded(state):
        # rank 0 reports its own shard: about half of each set's neurons
        assert state["tp_size"] == 2
        assert 0 < state["sets"]["A"]["local_neurons"] < state["sets"]["A"]["num_neurons"]

    try:
        check_engine(llm, tiny_models["gemma3"], sharded)
    finally:
        shutdown(llm)
