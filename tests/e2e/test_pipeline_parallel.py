"""Pipeline parallel (PP=2) on a real engine under ``mp``, on 2 CPU cores, oracle-equal.

vLLM 0.32's eager CPU workers never allocate the receive buffer of PP ranks > 0, so
without the plugin's fix (``vllm_adapter.patch_cpu_pipeline_receive_buffer``) this
engine dies on its first step (``assert self.intermediate_tensors is not None``).
With it, each stage wraps its own layers under their global indices: sets over both
stages or the second stage only, and discovery across the stages, match the oracle.
"""

from __future__ import annotations

import os

import pytest

from vllm_negablate.oracle import HFAblationOracle
from vllm_negablate.testing.engines import make_llm, shutdown
from vllm_negablate.testing.leftovers import Leftovers
from vllm_negablate.testing.parallel import check_discovery, check_pipeline_parallel_2, write_corpus

pytestmark = pytest.mark.slow

KIND = "gemma3"  # 2 layers: one per stage


def test_pipeline_parallel_2_under_mp_keeps_global_layer_indices(tiny_models, monkeypatch, tmp_path):
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) < 2:
        pytest.skip("needs 2 CPU cores (one per stage)")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[1]}")
    model_dir = tiny_models[KIND]
    oracle = HFAblationOracle(model_dir)
    leftovers = Leftovers(os.getpid())
    llm = make_llm(model_dir, pipeline_parallel_size=2, distributed_executor_backend="mp")
    try:
        config = llm.llm_engine.vllm_config.parallel_config
        assert (config.distributed_executor_backend, config.pipeline_parallel_size) == ("mp", 2)
        check_pipeline_parallel_2(llm, model_dir, oracle)
        result = check_discovery(llm, oracle, write_corpus(tmp_path / "wiki-head.txt"), tokens=256)
        assert result.metadata["tp_size"] == 1
    finally:
        leftovers.record()
        shutdown(llm)
    leftovers.check()  # workers killed after a missed shutdown grace leave their segments
