"""Small helpers to start and stop offline vLLM engines in tests and benchmarks."""

from __future__ import annotations

import gc
import random
from pathlib import Path
from typing import Any

BOS = 2  # tiny models' <bos>
TOL = 2e-4  # fp32 vLLM vs transformers; observed differences are ~1e-5

# `negablate serve` sized for the tiny test models (server.launcher.ServerProcess kwargs)
TINY_SERVER = {"served_name": "tiny", "kv_cache_bytes": 64 * 2**20, "max_model_len": 512}


def make_llm(model_dir: str | Path, **overrides: Any):
    """An offline engine with CPU-friendly defaults (small explicit KV cache, eager)."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=512,
        kv_cache_memory_bytes=64 * 2**20, enable_prefix_caching=True, seed=0,
        max_num_seqs=16,
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def shutdown(llm: Any) -> None:
    from vllm_negablate.vllm_adapter import shutdown_llm

    shutdown_llm(llm)
    del llm
    gc.collect()


def random_prompts(n: int = 3, length: int = 40, seed: int = 0, vocab: int = 500) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(4, vocab) for _ in range(length - 1)] for _ in range(n)]


def max_diff(a: list[float | None], b: list[float | None]) -> float:
    """Largest absolute difference of two prompt-logprob rows (first entry is None)."""
    return max(abs(x - y) for x, y in zip(a[1:], b[1:], strict=True))
