"""Asking for the Ray executor without ray installed: a clear message naming the extra,
before any engine starts (vLLM itself fails deep in start-up with a bare import error)."""

from __future__ import annotations

import importlib.util

import pytest

from vllm_negablate import executors
from vllm_negablate.executors import ExecutorUnavailableError, require_executor_backend


@pytest.fixture
def no_ray(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(executors.importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))


def test_ray_without_ray_names_the_extra(no_ray):
    with pytest.raises(ExecutorUnavailableError, match=r"pip install 'vllm-negablate\[ray\]'"):
        require_executor_backend("ray")
    for backend in (None, "mp", "uni"):
        require_executor_backend(backend)  # nothing to install


def test_serve_refuses_before_any_engine(no_ray):
    from server.app import parse_args

    with pytest.raises(SystemExit, match=r"negablate serve: --distributed-executor-backend ray needs the 'ray'"):
        parse_args(["/nonexistent/model", "--distributed-executor-backend", "ray"])
    args = parse_args(["/nonexistent/model", "--distributed-executor-backend", "mp"])
    assert args.distributed_executor_backend == "mp"


def test_the_extra_is_declared():
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    assert any(req.startswith("ray") for req in project["optional-dependencies"]["ray"])
