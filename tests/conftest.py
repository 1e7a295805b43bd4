"""Shared fixtures: tiny random models built at test time (no hub), seeded neuron sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm_eval subprocesses read local JSONL
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("NEGABLATE_MAX_SETS", "32")  # tests load many sets into one engine

from vllm_negablate.testing.tiny_models import build_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {kind: build_tiny_model(kind, root / kind) for kind in ("gpt_neox", "llama", "gemma3")}
