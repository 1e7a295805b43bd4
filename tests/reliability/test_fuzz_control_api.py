"""Fuzz the control API from its own OpenAPI schema (schemathesis), in process.

The app is the real control router + middleware + registry, with vLLM's own
exception handlers, over a real WorkerRuntime on a fake model (no engine, so
thousands of calls take seconds). Each generated case is sent three times:
without credentials and with a wrong key (both must be 401 and change
nothing), then with the admin key (never a 5xx; a rejected call changes
nothing: registry, files on disk and worker state are compared).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.middleware import NegablateMiddleware
from server.registry import SetRegistry
from server.routes import router
from vllm_negablate.context import set_runtime
from vllm_negablate.neuron_set import LayerAblation, NeuronSet
from vllm_negablate.runtime import WorkerRuntime
from vllm_negablate.testing.fake_model import FakeModel, fake_fingerprint, random_weights
from vllm_negablate.worker_extension import NegablateWorkerExtension

ADMIN = "fuzz-admin"
FP = fake_fingerprint(2, 8)
STATS = {"cases": 0, "rejected": 0, "accepted": 0}


def build_app(sets_dir) -> FastAPI:
    from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

    runtime = WorkerRuntime.for_model(FakeModel(random_weights(2, 8, 4)), FP, max_sets=6, max_num_tokens=16)
    set_runtime(runtime)

    async def rpc(method, *args):
        set_runtime(runtime)  # other test modules bind their own runtimes in between
        return [getattr(NegablateWorkerExtension, method)(None, *args)]

    app = FastAPI(title="negablate control API (fuzz)")
    app.include_router(router)
    app.add_middleware(NegablateMiddleware)
    init_exception_handler(app)
    registry = SetRegistry(rpc, sets_dir, max_resident=3)
    asyncio.run(registry.startup())
    for name, neurons in (("alpha", [0, 1]), ("beta", [2])):
        asyncio.run(registry.put(NeuronSet(name=name, model=FP, entries=[LayerAblation(layer=0, neurons=neurons)])))
    app.state.negablate = registry
    app.state.negablate_admin_key = ADMIN
    app.state.negablate_api_keys = []
    app.state.runtime = runtime
    app.state.args = argparse.Namespace(log_error_stack=False)  # read by vLLM's handlers
    return app


APP = None


def get_app(tmp_dir):
    global APP
    if APP is None:
        APP = build_app(tmp_dir)
    return APP


import tempfile  # noqa: E402

_DIR = tempfile.mkdtemp(prefix="negablate-fuzz-")
from pathlib import Path  # noqa: E402

schema = schemathesis.openapi.from_asgi("/openapi.json", get_app(Path(_DIR)))


def snapshot(app) -> str:
    reg = app.state.negablate
    rt = app.state.runtime
    files = {p.name: p.read_text() for p in sorted(Path(_DIR).iterdir())}
    return json.dumps({
        "sets": {n: s.model_dump(mode="json") for n, s in reg.sets.items()},
        "default": reg.default, "resident": reg.resident, "in_flight": dict(reg.in_flight),
        "worker": {"names": rt.names, "default": rt.default_name}, "files": files,
    }, sort_keys=True)


# One test per operation, parametrized here rather than by ``schema.parametrize()``: that
# gives every operation the same node id, which pytest-xdist collapses into one test.
OPERATIONS = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_control_api_fuzz(operation, data):
    app = APP
    case = data.draw(OPERATIONS[operation].as_strategy())
    STATS["cases"] += 1
    before = snapshot(app)
    for headers in ({}, {"Authorization": "Bearer not-the-key"}):
        response = case.call(headers=headers)
        assert response.status_code == 401, (case.method, case.path, response.text)
        assert snapshot(app) == before
    response = case.call(headers={"Authorization": f"Bearer {ADMIN}"})
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
    body = response.json()
    if response.status_code >= 400:
        STATS["rejected"] += 1
        if response.status_code != 405:  # unsupported methods: Starlette's own router answer
            assert isinstance(body.get("error"), dict), (case.method, case.formatted_path, body)
            assert set(body["error"]) >= {"message", "type", "code"}  # OpenAI-style error
        assert snapshot(app) == before, (case.method, case.formatted_path, response.text)
    else:
        STATS["accepted"] += 1


def test_fuzz_ran_enough_cases():
    print(f"fuzz cases: {STATS}")
    assert STATS["cases"] >= 500, STATS
    assert STATS["rejected"] > 50 and STATS["accepted"] > 5


def teardown_module(module):
    set_runtime(None)
