"""Shared fixtures (tiny random models built at test time, no hub) and the suite's layout
on CPU cores.

The suite is mostly vLLM engine start-ups (process spawns and imports, one core each),
so it runs in pytest-xdist workers (``-n auto`` in pyproject), a test file per worker at a
time (``--dist loadfile``: module fixtures such as one server per file stay whole). Each
worker's vLLM engines get their own share of the cores (``VLLM_CPU_OMP_THREADS_BIND``),
so two engines never spin on the same core, and the heaviest files start first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm_eval subprocesses read local JSONL
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("NEGABLATE_WORKER_SLOTS", "32")  # tests load many sets into one engine

from vllm_negablate.testing.tiny_models import build_tiny_model  # noqa: E402

MAX_WORKERS = 4  # each worker runs one or two small engines at a time; more would crowd memory


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _bind_this_worker_to_its_cores() -> None:
    """In xdist worker i of n: vLLM CPU workers started from here use cores[i::n]."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER"), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = _cores()
    if not worker or count < 2 or len(cores) < count or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    mine = cores[int(worker.removeprefix("gw")) % count::count]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))
    os.environ.setdefault("OMP_NUM_THREADS", str(len(mine)))
    import torch

    torch.set_num_threads(len(mine))


_bind_this_worker_to_its_cores()

# Longest first, so no long file starts last on one worker while the other idles
# (seconds measured on 2 quiet cores; unlisted files are short).
_FILE_COST = {
    "test_layer_analysis.py": 380, "test_reproduce_tiny.py": 225, "test_bench_smoke.py": 180,
    "test_vllm_exact.py": 130, "test_vllm_modes.py": 125, "test_server.py": 115,
    "test_eval_live.py": 95, "test_lm_tasks.py": 95, "test_real_models.py": 65,
    "test_pos_analysis.py": 60, "test_serving_churn.py": 60, "test_discovery_vllm.py": 45,
    "test_scoring_fast_paths.py": 80,
    # estimates: measured only on loaded cores (170 s and 470 s; test_vllm_modes' TP=2 alone: 345 s)
    "test_ray.py": 150, "test_pipeline_parallel.py": 70,
}


def pytest_xdist_auto_num_workers(config) -> int:
    return max(1, min(len(_cores()), MAX_WORKERS))


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: -_FILE_COST.get(item.path.name, 0))  # stable: order within a file kept


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("gpt_neox", "llama", "gemma3")}
