"""Checks shared by the tests of parallel engines (TP=2 / PP=2, under ``mp`` or Ray).

Each check compares a real engine with the transformers oracle (:mod:`vllm_negablate.oracle`)
on the tiny Gemma 3 (2 layers of 128 neurons: 64 per TP rank, one layer per PP stage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from vllm_negablate.discovery.pipeline import DiscoveryResult, find_neurons
from vllm_negablate.offline import load_neuron_set, score_prompts
from vllm_negablate.testing.engines import TOL, max_diff, random_prompts
from vllm_negablate.testing.sets import random_set
from vllm_negablate.testing.tiny_models import wikitext_head

__all__ = ["check_discovery", "check_pipeline_parallel_2", "write_corpus"]


def write_corpus(path: Path, chars: int = 8_000) -> Path:
    """The head of WikiText-2's validation text (or the built-in fallback) at ``path``."""
    path.write_text(wikitext_head(100, fallback_repeats=20)[:chars], encoding="utf-8")
    return path


def check_discovery(llm: Any, oracle: Any, corpus: Path, tokens: int = 512,
                    layers: int = 2, width: int = 128) -> DiscoveryResult:
    """Discovery merges the ranks' halves (TP) or layers (PP) into the oracle's values.

    The raw pre-activations the workers kept (``keep_exact``) equal the oracle's for
    every layer and neuron (< 1e-3), and so do the streaming W1 statistics.
    """
    result = find_neurons(llm, corpus, window_tokens=128, max_tokens=tokens, top_percent=5.0,
                          keep_exact=tokens, use_tqdm=False)
    assert result.metadata["num_tokens"] == tokens
    for layer in range(layers):
        expected = np.concatenate([oracle.capture_preactivations(w, layers=[layer])[layer].numpy()
                                   for w in result.windows])
        assert result.exact[layer].shape == expected.shape == (tokens, width)
        assert np.abs(result.exact[layer] - expected).max() < 1e-3, layer
    assert result.stats["w1"].shape == (layers, width)
    assert result.stats["count"].tolist() == [tokens] * layers
    assert result.metadata["streaming_w1_max_abs_error"] < 1e-3
    return result


def check_pipeline_parallel_2(llm: Any, model_dir: Path, oracle: Any) -> None:
    """PP=2 keeps global layer indices: rank 0 wraps layer 0, rank 1 layer 1, and sets
    (one over both stages, one on the second stage only) change exactly the oracle's
    layers, in one mixed batch."""
    replies = llm.collective_rpc("negablate_state")
    assert sorted(tuple(r["state"]["layers"]) for r in replies) == [(0,), (1,)]
    both = random_set(model_dir, "both", "negative", seed=41)
    late = random_set(model_dir, "late", "both", seed=42, layers=[1])
    load_neuron_set(llm, both)
    load_neuron_set(llm, late)
    texts = random_prompts(2, seed=43)
    got = score_prompts(llm, texts * 3, neuron_set=[None, None, "both", "both", "late", "late"])
    for i, ns in enumerate([None, both, late]):
        for j, text in enumerate(texts):
            assert max_diff(got[2 * i + j], oracle.prompt_logprobs(text, ns)) < TOL, (i, j)
    # both sets really ablate (so equality with the oracle is not equality with no ablation)
    assert max_diff(got[0], got[2]) > 1e-3 and max_diff(got[0], got[4]) > 1e-3
