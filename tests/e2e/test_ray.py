"""The plugin under vLLM's Ray executor on 2 CPU cores: TP=2, PP=2 and the server, oracle-equal.

vLLM 0.32 refuses Ray on its CPU platform (issue #21602); the project's opt-in makes it
run (``vllm_negablate.ray_platform``, ``vllm_negablate.executors``), and the tests use
it the three ways a user does, one Ray node each, one after the other:

* ``negablate serve --distributed-executor-backend ray`` with no Ray running: the
  server starts a node with fake GPUs (placement only: the actors run vLLM's CPU
  worker) and stops it;
* offline, TP=2 in ``local_ray_cpu_node``, which also sets ``NEGABLATE_RAY_ON_CPU=1``
  and ``RAY_ADDRESS`` for the engines started in it;
* offline, PP=2 on a node started without the variable (as ``ray start`` in another
  shell would), the driver alone exporting it.

Ray is started and stopped here. After each cluster, every process it had (engine
core, Ray's node processes, the actors) must be gone, and the shared-memory
segments vLLM's Ray workers leak (``RayExecutorV2.shutdown`` kills its actors, so
they never unlink their ``*-cpushm_N`` and ``psm_*`` segments: vLLM's leak, not the
plugin's) are removed: only segments those processes had mapped or open, and only
once no process uses them (``vllm_negablate.testing.leftovers``). Skipped without
``ray`` (the ``[ray]`` extra).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="ray is not installed: pip install 'vllm-negablate[ray]' (the optional [ray] extra)")

from server.client import NegablateClient  # noqa: E402
from server.launcher import ServerProcess  # noqa: E402
from vllm_negablate.executors import ENV_CPU_BIND, ENV_RAY_ADDRESS, RAY_ON_CPU_ENV, local_ray_cpu_node  # noqa: E402
from vllm_negablate.offline import (  # noqa: E402
    ablation_state,
    load_neuron_set,
    sampling_params,
    score_prompts,
    set_default_neuron_set,
    unload_neuron_set,
)
from vllm_negablate.oracle import HFAblationOracle  # noqa: E402
from vllm_negablate.testing.engines import TINY_SERVER, TOL, make_llm, max_diff, random_prompts, shutdown  # noqa: E402
from vllm_negablate.testing.leftovers import Leftovers  # noqa: E402
from vllm_negablate.testing.parallel import check_discovery, check_pipeline_parallel_2, write_corpus  # noqa: E402
from vllm_negablate.testing.sets import random_set  # noqa: E402

pytestmark = pytest.mark.slow

KIND = "gemma3"  # GeGLU-tanh, 2 layers, 128 neurons: 64 per TP rank, 1 layer per PP stage
FAKE_GPUS = 2  # one per rank; the engines of this file run one after the other


def _two_cores() -> list[int]:
    from vllm_negablate.vllm_adapter import is_cpu_platform

    if not is_cpu_platform():
        pytest.skip("CPU only: on GPUs vLLM runs Ray by itself")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores (one per rank)")
    return cores[:2]


@pytest.fixture(scope="class")
def ray_node() -> Iterator[Leftovers]:
    """The offline helper's node: ``local_ray_cpu_node`` with 2 fake GPUs, one core per rank."""
    cores = _two_cores()
    leftovers = Leftovers(os.getpid())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_CPU_BIND, f"{cores[0]}|{cores[1]}")
        with local_ray_cpu_node(FAKE_GPUS, num_cpus=2) as address:
            assert os.environ[ENV_RAY_ADDRESS] == address and os.environ[RAY_ON_CPU_ENV] == "1"
            yield leftovers
            leftovers.record()
    assert not ray.is_initialized() and RAY_ON_CPU_ENV not in os.environ
    leftovers.check()


@pytest.fixture
def users_ray_node(monkeypatch) -> Iterator[Leftovers]:
    """A node as ``ray start --head --num-gpus 2`` from a plain shell makes it: its processes
    (and so Ray's actors) lack ``NEGABLATE_RAY_ON_CPU``, which only the driver exports. The
    actors get it from the engine's Ray runtime env (``vllm_adapter.forward_ray_on_cpu``)."""
    cores = _two_cores()
    leftovers = Leftovers(os.getpid())
    for var in (ENV_RAY_ADDRESS, RAY_ON_CPU_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ENV_CPU_BIND, f"{cores[0]}|{cores[1]}")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address="local", num_cpus=2, num_gpus=FAKE_GPUS, include_dashboard=False)
    try:
        monkeypatch.setenv(ENV_RAY_ADDRESS, ray.get_runtime_context().gcs_address)
        monkeypatch.setenv(RAY_ON_CPU_ENV, "1")
        yield leftovers
        leftovers.record()
    finally:
        ray.shutdown()
    leftovers.check()


@pytest.fixture(scope="module")
def oracle(tiny_models):
    return HFAblationOracle(tiny_models[KIND])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus") / "wiki-head.txt")


@contextlib.contextmanager
def ray_llm(leftovers: Leftovers, model_dir: Path, **parallel) -> Iterator:
    llm = make_llm(model_dir, distributed_executor_backend="ray", **parallel)
    try:
        yield llm
    finally:
        leftovers.record()  # the actors and their segments, before they are killed
        shutdown(llm)


# ---------------------------------------------------------------------- the server
# Each part starts its own Ray node and checks it away before the next starts.

def test_serve_over_ray_tp2_matches_the_oracle(tiny_models, oracle, tmp_path, monkeypatch):
    """``negablate serve --distributed-executor-backend ray --tensor-parallel-size 2``,
    with no Ray running: the server starts its own node (2 fake GPUs) and stops it."""
    cores = _two_cores()
    for var in (ENV_RAY_ADDRESS, RAY_ON_CPU_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(ENV_CPU_BIND, f"{cores[0]}|{cores[1]}")
    model_dir = tiny_models[KIND]
    a = random_set(model_dir, "A", "negative", seed=21)
    texts = random_prompts(2, seed=31)
    server = ServerProcess(model_dir, "--distributed-executor-backend", "ray", "--tensor-parallel-size", "2",
                           log_path=tmp_path / "server.log", start_timeout=600, **TINY_SERVER)
    with server, NegablateClient(server.url, admin_key=server.admin_key) as client:
        leftovers = Leftovers(server.proc.pid)
        client.upload_set(a)
        state = client.state()
        scored = {name: client.score(texts, name) for name in ("A", None)}  # tiny@A, tiny@none
        leftovers.record()
    assert sorted((w.tp_rank, w.tp_size) for w in state.workers) == [(0, 2), (1, 2)]
    assert any("raylet" in c for c in leftovers.cmdlines.values()), "no Ray node under the server"
    assert sum("RayWorkerProc" in c for c in leftovers.cmdlines.values()) == 2, leftovers.cmdlines
    for name, ns in (("A", a), (None, None)):
        for row, text in zip(scored[name], texts):
            assert max_diff(row.logprobs, oracle.prompt_logprobs(text, ns)) < TOL, name
    assert max_diff(scored["A"][0].logprobs, scored[None][0].logprobs) > 1e-3
    leftovers.check()


# ------------------------------------------------------------------------------- TP=2

class TestTensorParallel2:
    @pytest.fixture(scope="class")
    def llm(self, ray_node, tiny_models):
        with ray_llm(ray_node, tiny_models[KIND], tensor_parallel_size=2) as llm:
            yield llm

    def test_worker_rpcs_reach_both_ranks(self, llm, tiny_models):
        config = llm.llm_engine.vllm_config.parallel_config
        assert (config.distributed_executor_backend, config.tensor_parallel_size) == ("ray", 2)
        a = random_set(tiny_models[KIND], "rpcA", "negative", seed=1)
        state = load_neuron_set(llm, a)
        assert state["tp_size"] == 2 and state["sets"]["rpcA"]["num_neurons"] == a.num_neurons()
        replies = llm.collective_rpc("negablate_state")
        assert sorted(r["state"]["tp_rank"] for r in replies) == [0, 1]
        shards = [r["state"]["sets"]["rpcA"]["local_neurons"] for r in replies]
        assert all(0 < s < a.num_neurons() for s in shards) and sum(shards) == a.num_neurons()
        assert "rpcA" not in unload_neuron_set(llm, "rpcA")["sets"]
        assert "rpcA" not in ablation_state(llm)["sets"]

    def test_mixed_sets_in_one_batch_match_the_oracle(self, llm, tiny_models, oracle):
        model_dir = tiny_models[KIND]
        a = random_set(model_dir, "A", "negative", seed=21)
        b = random_set(model_dir, "B", "positive", seed=22)
        load_neuron_set(llm, a)
        load_neuron_set(llm, b)
        texts = random_prompts(2, seed=31)
        got = score_prompts(llm, texts * 3, neuron_set=[None, "A", "B", "B", None, "A"])
        for row, text, ns in zip(got, texts * 3, [None, a, b, b, None, a]):
            assert max_diff(row, oracle.prompt_logprobs(text, ns)) < TOL
        assert max_diff(got[0], got[5]) > 1e-3 and max_diff(got[1], got[3]) > 1e-3

    def test_default_switch_leaves_requests_in_flight_on_their_set(self, llm, tiny_models, oracle):
        model_dir = tiny_models[KIND]
        d = random_set(model_dir, "dflt", "negative", seed=6)
        load_neuron_set(llm, d)
        text = random_prompts(1, seed=11)[0]
        engine = llm.llm_engine
        params = sampling_params(None, max_tokens=48, temperature=0.0, logprobs=0, detokenize=False)
        set_default_neuron_set(llm, "dflt")
        engine.add_request("early", {"prompt_token_ids": text}, params)
        outputs = {}
        while "early" not in outputs:
            outputs.update((o.request_id, o) for o in engine.step())
        assert not outputs["early"].finished
        assert set_default_neuron_set(llm, None)["in_flight"] >= 1  # switched under a running request
        engine.add_request("late", {"prompt_token_ids": text}, params)
        while engine.has_unfinished_requests():
            outputs.update((o.request_id, o) for o in engine.step())
        for rid, ns in (("early", d), ("late", None)):
            out = outputs[rid].outputs[0]
            ref = oracle.prompt_logprobs(text + list(out.token_ids), ns)
            assert len(out.token_ids) == 48
            for k, (tok, lps) in enumerate(zip(out.token_ids, out.logprobs)):
                assert abs(lps[tok].logprob - ref[len(text) + k]) < TOL, (rid, k)
        early, late = (outputs[r].outputs[0] for r in ("early", "late"))
        assert early.token_ids != late.token_ids or abs(
            early.logprobs[0][early.token_ids[0]].logprob - late.logprobs[0][late.token_ids[0]].logprob) > 1e-3

    def test_prefix_cache_never_crosses_neuron_sets(self, llm, tiny_models, oracle):
        model_dir = tiny_models[KIND]
        a = random_set(model_dir, "cacheA", "negative", seed=3)
        load_neuron_set(llm, a)
        text = random_prompts(1, length=300, seed=9)[0]  # 2 full KV blocks (CPU block: 128)

        def run(name):
            params = sampling_params(name, max_tokens=1, temperature=0.0, logprobs=0, detokenize=False)
            out = llm.generate([{"prompt_token_ids": text}], params, use_tqdm=False)[0]
            token = out.outputs[0].token_ids[0]
            return token, out.outputs[0].logprobs[0][token].logprob, out.num_cached_tokens or 0

        tok_a, lp_a, _ = run("cacheA")
        tok_a2, lp_a2, cached_a = run("cacheA")
        tok_n, lp_n, cached_n = run("none")
        assert cached_a >= 256, "prefix caching is not active: the test would prove nothing"
        assert cached_n == 0
        assert tok_a2 == tok_a and abs(lp_a2 - lp_a) < 1e-5
        assert abs(lp_a - oracle.prompt_logprobs(text + [tok_a], a)[-1]) < TOL
        assert abs(lp_n - oracle.prompt_logprobs(text + [tok_n])[-1]) < TOL

    def test_discovery_merges_the_tp_shards(self, llm, oracle, corpus):
        result = check_discovery(llm, oracle, corpus)
        assert result.metadata["tp_size"] == 2


# ------------------------------------------------------------------------------- PP=2

def test_pipeline_parallel_2_keeps_global_layer_indices(users_ray_node, tiny_models, oracle):
    """PP=2 on a node started without the opt-in (see users_ray_node), so the actors run
    only because the variable reached them through the runtime env; and the PP
    receive-buffer fix (vllm_adapter) works in Ray's actors too: oracle-equal."""
    with ray_llm(users_ray_node, tiny_models[KIND], pipeline_parallel_size=2) as llm:
        config = llm.llm_engine.vllm_config.parallel_config
        assert (config.distributed_executor_backend, config.pipeline_parallel_size) == ("ray", 2)
        assert config.ray_runtime_env["env_vars"][RAY_ON_CPU_ENV] == "1"
        check_pipeline_parallel_2(llm, tiny_models[KIND], oracle)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v", "-p", "no:xdist"]))
