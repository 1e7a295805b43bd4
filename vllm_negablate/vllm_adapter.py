"""Every touch of vLLM internals, in one place (tested against vllm 0.32).

vLLM has no public hook for "after the model is loaded", "the token layout of
this step" or "a request was admitted", so the plugin patches four methods.
Each patch calls the original and adds one step; if a future vLLM renames a
method, :func:`install` fails loudly at start-up with the name that moved.

* ``BaseModelLoader.load_model`` (worker): wrap the MLP activations of the
  loaded model and create the process's :class:`WorkerRuntime`.
* ``GPUModelRunner._update_states`` (worker; the CPU runner inherits it): once
  the persistent batch is up to date, pin new requests and build the step plan.
* ``GPUModelRunner.execute_model`` (worker): clear the plan after the forward,
  so dummy/profile runs never see a stale one.
* ``EngineCore.add_request`` / ``EngineCore.collective_rpc`` (engine core):
  pin each request's set and salt its prefix-cache key (see engine_hooks).
* ``EngineArgs.create_engine_config`` (front end): default
  ``worker_extension_cls`` to ours so plain ``vllm serve`` gets the RPCs.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from vllm_negablate.engine_hooks import EngineCoreMirror, UnknownNeuronSetError, pin_request

logger = logging.getLogger("vllm_negablate")

WORKER_EXTENSION = "vllm_negablate.worker_extension.NegablateWorkerExtension"
_PATCHED_ATTR = "_negablate_patched"



def engine_mirror(engine_core: Any) -> EngineCoreMirror:
    """The mirror of one engine core (one per instance: tests start several engines)."""
    mirror = engine_core.__dict__.get("_negablate_mirror")
    if mirror is None:
        mirror = engine_core.__dict__["_negablate_mirror"] = EngineCoreMirror()
    return mirror


def _patch(owner: type, name: str, make_wrapper) -> None:
    original = getattr(owner, name, None)
    if original is None:
        raise RuntimeError(
            f"vllm_negablate: {owner.__module__}.{owner.__qualname__}.{name} not found; "
            "this vLLM version is not supported (see vllm_negablate.SUPPORTED_VLLM)"
        )
    if getattr(original, _PATCHED_ATTR, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _PATCHED_ATTR, True)
    setattr(owner, name, wrapper)


# ----------------------------------------------------------------- front end
def patch_engine_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            if not self.worker_extension_cls:
                self.worker_extension_cls = WORKER_EXTENSION
            elif self.worker_extension_cls != WORKER_EXTENSION:
                logger.warning(
                    "worker_extension_cls=%s is set; neuron-set RPCs (%s) are unavailable",
                    self.worker_extension_cls, WORKER_EXTENSION,
                )
            return original(self, *args, **kwargs)

        return create_engine_config

    _patch(EngineArgs, "create_engine_config", make)


# --------------------------------------------------------------- engine core
def patch_engine_core() -> None:
    from vllm.v1.engine.core import EngineCore

    def make_rpc(original):
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            results = original(self, method, timeout, args, kwargs)
            if isinstance(method, str) and method.startswith("negablate_") and results:
                first = results[0]
                if isinstance(first, dict) and "state" in first:
                    engine_mirror(self).update(first["state"])
            return results

        return collective_rpc

    def make_add(original):
        def add_request(self, request, request_wave: int = 0):
            mirror = engine_mirror(self)
            if not mirror.initialized:
                _refresh_mirror(self)
            try:
                pin_request(request, mirror)
            except UnknownNeuronSetError as exc:
                _refresh_mirror(self)  # a set may have been loaded out of band
                try:
                    pin_request(request, mirror)
                except UnknownNeuronSetError:
                    # No clean way to fail one request from here without hanging the
                    # client: the worker computes it with NaN bounds (see runtime).
                    logger.error("request %s: %s; its log-probs will be NaN", request.request_id, exc)
            return original(self, request, request_wave)

        return add_request

    _patch(EngineCore, "collective_rpc", make_rpc)
    _patch(EngineCore, "add_request", make_add)


def _refresh_mirror(engine_core: Any) -> None:
    try:
        results = engine_core.collective_rpc("negablate_state")
    except Exception as exc:  # extension not installed: nothing to mirror
        logger.debug("negablate_state RPC unavailable: %s", exc)
        engine_mirror(engine_core).initialized = True
        return
    if results and isinstance(results[0], dict) and "state" in results[0]:
        engine_mirror(engine_core).update(results[0]["state"])


# -------------------------------------------------------------------- worker
def patch_model_loader() -> None:
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    def make(original):
        def load_model(self, vllm_config, model_config, prefix: str = ""):
            model = original(self, vllm_config, model_config, prefix)
            if prefix == "" and model_config is vllm_config.model_config:
                install_runtime(model, vllm_config)
            return model

        return load_model

    _patch(BaseModelLoader, "load_model", make)


def install_runtime(model, vllm_config) -> None:
    """Wrap the model's activations and bind a WorkerRuntime to this process."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    from vllm_negablate.context import set_runtime
    from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet
    from vllm_negablate.runtime import WorkerRuntime

    model_config = vllm_config.model_config
    text_config = model_config.hf_text_config
    architectures = getattr(model_config.hf_config, "architectures", None) or [
        type(model).__name__
    ]
    fingerprint = ModelFingerprint(
        architecture=architectures[0],
        num_layers=text_config.num_hidden_layers,
        intermediate_size=_intermediate_size(text_config),
    )
    runtime = WorkerRuntime.for_model(
        model,
        fingerprint,
        tp_rank=get_tensor_model_parallel_rank(),
        tp_size=get_tensor_model_parallel_world_size(),
        dtype=model_config.dtype,
        kernel=_choose_kernel(vllm_config),
        max_num_tokens=max(vllm_config.scheduler_config.max_num_batched_tokens, 1),
    )
    set_runtime(runtime)
    _patch_model_runner()
    logger.info(
        "vllm_negablate: wrapped %d MLP activations (%s), tp %d/%d, kernel=%s",
        len(runtime.layers), runtime.layers[0].activation, runtime.tp_rank,
        runtime.tp_size, runtime.kernel,
    )
    sets_dir = os.environ.get("NEGABLATE_NEURON_SETS_DIR")
    if sets_dir:
        for path in sorted(Path(sets_dir).glob("*.json")):
            try:
                runtime.load_set(NeuronSet.load(path))
            except Exception as exc:  # one bad file must not stop the others
                logger.error("vllm_negablate: skipping %s: %s", path, exc)
        default = os.environ.get("NEGABLATE_DEFAULT_SET")
        if default:
            runtime.set_default(default)


def _intermediate_size(text_config) -> int:
    for attr in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    hidden = getattr(text_config, "hidden_size", None) or text_config.n_embd
    return 4 * hidden  # GPT-2 convention when n_inner is None


def _choose_kernel(vllm_config) -> str:
    forced = os.environ.get("NEGABLATE_KERNEL")
    if forced:
        return forced
    from vllm.platforms import current_platform

    if current_platform.is_cpu() or vllm_config.model_config.enforce_eager:
        return "sparse"
    mode = getattr(vllm_config.compilation_config, "cudagraph_mode", None)
    if mode is not None and str(getattr(mode, "name", mode)) != "NONE":
        return "dense"  # captured graphs replay kernels, not Python: use the graph-safe one
    return "sparse"


def _patch_model_runner() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_negablate.context import get_runtime

    def make_update(original):
        def _update_states(self, scheduler_output):
            result = original(self, scheduler_output)
            runtime = get_runtime()
            if runtime is not None:
                req_ids = self.input_batch.req_ids
                runtime.begin_step(
                    req_ids,
                    scheduler_output.num_scheduled_tokens,
                    {
                        rid: getattr(self.requests[rid].sampling_params, "extra_args", None)
                        for rid in req_ids
                        if rid not in runtime.request_slots and rid in self.requests
                    },
                    finished_req_ids=tuple(scheduler_output.finished_req_ids),
                )
            return result

        return _update_states

    def make_execute(original):
        def execute_model(self, scheduler_output, intermediate_tensors=None):
            try:
                return original(self, scheduler_output, intermediate_tensors)
            finally:
                runtime = get_runtime()
                if runtime is not None:
                    runtime.end_step()

        return execute_model

    _patch(GPUModelRunner, "_update_states", make_update)
    _patch(GPUModelRunner, "execute_model", make_execute)


def install() -> None:
    """Apply the process-wide patches (idempotent; safe in every vLLM process)."""
    patch_engine_args()
    patch_engine_core()
    patch_model_loader()
