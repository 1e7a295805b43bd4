"""Every touch of vLLM internals, in one place (tested against vllm 0.32).

No other module of ``vllm_negablate``, ``server``, ``eval`` or ``bench`` may
use a private vLLM name; ``tests/unit/test_vllm_internals.py`` enforces it
with the lists below, and checks them against this module's code.

What "private vLLM name" means here
-----------------------------------
vLLM's *public* Python surface, for this project, is:

* the top-level names under "Public vLLM imports" below, a subset of
  ``vllm.__all__`` (the test checks that), imported as ``from vllm import X``
  or read as ``vllm.X`` after ``import vllm``;
* the documented methods and fields of those objects and of what they return:
  ``LLM.generate``, ``LLM.get_tokenizer``, ``LLM.collective_rpc`` (the
  documented way to call a ``worker_extension_cls``), ``RequestOutput`` /
  ``CompletionOutput`` fields, ``SamplingParams`` fields (``extra_args``
  included);
* documented request inputs under their documented names (``cache_salt``,
  ``vllm_xargs``, which becomes ``SamplingParams.extra_args``) and the plugin
  hooks (the ``vllm.general_plugins`` entry point, the
  ``worker_extension_cls`` and ``--middleware`` options);
* the JSON fields of the OpenAI-compatible HTTP API (``ModelList.data``,
  ``ModelCard.id``, ...): they are vLLM's documented wire format.

Everything else is private:

(a) importing any vLLM module but the top-level package (``from vllm.x import
    y``, ``import vllm.x``), or a top-level name not in the public list;
(b) reading, writing or patching any other attribute of an object vLLM hands
    out (``llm.llm_engine``, ``.engine_core``, ``GPUModelRunner._update_states``,
    ``app.state.openai_serving_models``, ``Request.block_hashes``, ...).

The test finds (a) exactly. For (b) it scans for the *distinctive* names
below; the *shared* names cannot be told from public or non-vLLM attributes
of the same name, but each is reached only through a distinctive name, a
private import, or an object vLLM passes to one of the patches here.

One accepted use lives outside: :mod:`vllm_negablate.engine_hooks` reads and
writes ``request.sampling_params`` and ``request.cache_salt`` on the engine
``Request`` that :func:`pin_request` hands it. Those two fields carry the
documented request inputs of the same names unchanged (the user's
``SamplingParams`` and ``cache_salt``); everything else about the ``Request``
(its block hashes) is done here.

Public vLLM imports (allowed anywhere)::

    LLM
    SamplingParams
    TokensPrompt
    __version__

Private vLLM modules imported here (module: names used)::

    vllm.distributed: get_pp_group, get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
    vllm.engine.arg_utils: EngineArgs
    vllm.entrypoints.launchers.api_server.app_state: init_app_state
    vllm.entrypoints.launchers.api_server.entry: build_async_engine_client
    vllm.entrypoints.launchers.app: build_app
    vllm.entrypoints.launchers.cli_args: make_arg_parser, validate_parsed_serve_args
    vllm.entrypoints.launchers.launcher: serve_http, setup_server
    vllm.entrypoints.launchers.utils.server_utils: get_uvicorn_log_config
    vllm.entrypoints.serve.engine.protocol: ModelCard, ModelPermission
    vllm.entrypoints.serve.utils.api_utils: cli_env_setup
    vllm.envs: VLLM_API_KEY, VLLM_HTTP_TIMEOUT_KEEP_ALIVE
    vllm.ir: ops
    vllm.logger: configure_logging_from_args
    vllm.model_executor.model_loader.base_loader: BaseModelLoader
    vllm.platforms: cpu_platform_plugin, current_platform
    vllm.utils.argparse_utils: FlexibleArgumentParser
    vllm.v1.engine.core: EngineCore
    vllm.v1.outputs: LogprobsTensors
    vllm.v1.sample.sampler: Sampler
    vllm.v1.worker.cpu_model_runner: CPUModelRunner
    vllm.v1.worker.gpu_model_runner: GPUModelRunner

Private vLLM attributes, distinctive names (any use elsewhere fails the test)::

    LLM.llm_engine                         the offline engine behind vllm.LLM
    LLMEngine.engine_core                  its engine-core client (shutdown)
    EngineArgs.create_engine_config        patched: default worker_extension_cls, Ray-on-CPU env
    EngineArgs.worker_extension_cls
    EngineCore.add_request                 patched: pin the set, salt the cache key
    GPUModelRunner._update_states          patched: pin new requests, build the step plan
    GPUModelRunner.execute_model           patched: clear the plan after the forward
    GPUModelRunner._get_prompt_logprobs_dict  patched: prompt log-probs of a step batched
    GPUModelRunner.num_prompt_logprobs
    GPUModelRunner.query_start_loc
    GPUModelRunner._sync_device
    InputBatch.req_id_to_index
    CachedRequestState.in_progress_prompt_logprobs_cpu
    CachedRequestState.num_computed_tokens
    ModelConfig.logprobs_mode
    VllmModel.compute_logits
    Sampler.compute_logprobs
    Sampler.gather_logprobs
    LogprobsTensors.empty_cpu
    IrOp.impls
    IrOp.register_impl
    Platform.import_ir_kernels
    Platform.get_default_ir_op_priority    patched on CPU: the C++ RMSNorm provider first
    GPUModelRunner.input_batch
    InputBatch.req_ids
    SchedulerOutput.num_scheduled_tokens
    SchedulerOutput.finished_req_ids
    ModelConfig.hf_config
    ModelConfig.hf_text_config
    VllmConfig.scheduler_config
    SchedulerConfig.max_num_batched_tokens
    VllmConfig.compilation_config
    CompilationConfig.cudagraph_mode
    Request.block_hashes                   recomputed after the salt changes
    Request._block_hasher
    Request.update_block_hashes
    EngineClient.get_supported_tasks
    State.openai_serving_models            vLLM's model list, on the FastAPI app.state
    State.engine_client                    the engine vLLM's routes call (continuation_logprobs)
    OpenAIServingModels.show_available_models
    OpenAIServingModels.is_base_model
    OpenAIServingModels.base_model_paths
    CPUModelRunner.initialize_kv_cache     patched: allocate the PP receive buffer
    GPUModelRunner.intermediate_tensors    PP ranks > 0: the receive buffer
    VllmModel.make_empty_intermediate_tensors
    GroupCoordinator.is_first_rank
    Platform.ray_device_key                "GPU" on the Ray-on-CPU platform
    ParallelConfig.ray_runtime_env         forwards NEGABLATE_RAY_ON_CPU to Ray actors

Private vLLM attributes, shared names (``LLM.collective_rpc`` is public,
pydantic models have a ``model_config``, ...: not scanned for)::

    BaseModelLoader.load_model             patched: wrap the activations, create the runtime
    EngineCore.collective_rpc              patched: mirror the worker state
    EngineClient.generate                  the async engine's (LLM.generate is public)
    EngineClient.collective_rpc
    EngineCoreClient.shutdown
    EngineClient.model_config
    LLMEngine.model_config
    VllmConfig.model_config
    OpenAIServingModels.model_config
    ModelConfig.model
    ModelConfig.dtype
    ModelConfig.max_model_len
    ModelConfig.enforce_eager
    GPUModelRunner.requests
    GPUModelRunner.model
    GPUModelRunner.sampler
    CachedRequestState.prompt_token_ids
    ModelConfig.get_vocab_size
    CachedRequestState.sampling_params
    Request.request_id
    BaseModelPath.name
    BaseModelPath.model_path
    GPUModelRunner.max_num_tokens
    GPUModelRunner.model_config
    GPUModelRunner.device
    VllmConfig.parallel_config
    ParallelConfig.distributed_executor_backend

The patches
-----------
vLLM has no public hook for "after the model is loaded", "the token layout of
this step" or "a request was admitted", so the plugin patches the methods
marked "patched" above. Each patch calls the original and adds one step; if a
future vLLM renames a method, :func:`install` fails loudly at start-up with the
name that moved.

* ``BaseModelLoader.load_model`` (worker): wrap the MLP activations of the
  loaded model and create the process's :class:`WorkerRuntime`.
* ``GPUModelRunner._update_states`` (worker; the CPU runner inherits it): once
  the persistent batch is up to date, pin new requests and build the step plan.
* ``GPUModelRunner.execute_model`` (worker): clear the plan after the forward,
  so dummy/profile runs never see a stale one.
* ``EngineCore.add_request`` / ``EngineCore.collective_rpc`` (engine core):
  pin each request's set and salt its prefix-cache key (see engine_hooks).
* ``EngineArgs.create_engine_config`` (front end): default
  ``worker_extension_cls`` to ours so plain ``vllm serve`` gets the RPCs; under
  Ray with ``NEGABLATE_RAY_ON_CPU`` set, forward that variable to the Ray actors
  (:func:`forward_ray_on_cpu`).
* ``CPUModelRunner.initialize_kv_cache`` (CPU worker): allocate the pipeline
  receive buffer that eager CPU workers never get (:func:`allocate_pp_receive_buffer`).

One more hook is not a patch: the Ray-on-CPU platform (:func:`ray_cpu_platform_qualname`,
named by the ``vllm.platform_plugins`` entry point in :mod:`vllm_negablate.ray_platform`)
is a subclass of vLLM's CPU platform built on first use (module ``__getattr__``).

After the patches come the small functions the rest of the project calls
instead of reaching into vLLM: the offline engine (:func:`engine_model_path`,
:func:`shutdown_llm`, ...) and the OpenAI server (:func:`serve_openai_app`,
:func:`extend_model_list`, :func:`serves_model`, ...).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm_negablate.executors import RAY_ON_CPU_ENV, ray_on_cpu_requested
from vllm_negablate.settings import get_settings

if TYPE_CHECKING:  # imported where used: see the note below
    from vllm_negablate.engine_hooks import EngineCoreMirror

# Imports of this module stay light (no torch op, no vLLM): with NEGABLATE_RAY_ON_CPU
# set, vLLM imports it *while it resolves its platform* (ray_cpu_platform_qualname), and
# engine_hooks -> runtime -> ops registers a custom op, which asks vLLM for that same
# platform: a nested resolution that would pick the plain CPU platform.

logger = logging.getLogger("vllm_negablate")

WORKER_EXTENSION = "vllm_negablate.worker_extension.NegablateWorkerExtension"
_PATCHED_ATTR = "_negablate_patched"



def engine_mirror(engine_core: Any) -> EngineCoreMirror:
    """The mirror of one engine core (one per instance: tests start several engines)."""
    from vllm_negablate.engine_hooks import EngineCoreMirror

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
            config = original(self, *args, **kwargs)
            forward_ray_on_cpu(config)
            return config

        return create_engine_config

    _patch(EngineArgs, "create_engine_config", make)


def forward_ray_on_cpu(vllm_config: Any) -> bool:
    """Under Ray with ``NEGABLATE_RAY_ON_CPU`` set: put it in the Ray runtime env of the engine.

    The Ray actors resolve vLLM's platform while they import vLLM, so the variable
    must be in their environment when they start. A node started by
    :func:`vllm_negablate.executors.local_ray_cpu_node` has it already; a cluster the
    user started (``ray start``) on another shell or machine does not. vLLM starts the
    engine's Ray job and its actors with ``parallel_config.ray_runtime_env``
    (``ray_utils.initialize_ray_cluster``, ``RayExecutorV2._build_runtime_env``), so
    its ``env_vars`` reach every actor before it imports anything. Returns whether it
    changed the config.
    """
    parallel = vllm_config.parallel_config
    if parallel.distributed_executor_backend != "ray" or not ray_on_cpu_requested():
        return False
    import copy

    from ray.runtime_env import RuntimeEnv

    runtime_env = copy.deepcopy(parallel.ray_runtime_env) if parallel.ray_runtime_env else RuntimeEnv()
    runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}),
                               RAY_ON_CPU_ENV: os.environ[RAY_ON_CPU_ENV]}
    parallel.ray_runtime_env = runtime_env
    return True


# ----------------------------------------------------- Ray on the CPU platform
RAY_CPU_PLATFORM = "RayCpuPlatform"


def ray_cpu_platform_qualname() -> str | None:
    """The Ray-on-CPU platform's qualname if vLLM's own detection picks a CPU platform, else None.

    Called by :func:`vllm_negablate.ray_platform.register` inside vLLM's platform
    resolution (so it must not touch ``current_platform``). vLLM lets an out-of-tree
    platform plugin win over the builtin one it would pick; None leaves vLLM's choice
    alone (a GPU machine stays on its GPU platform).
    """
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() is None:
        return None
    return f"{__name__}.{RAY_CPU_PLATFORM}"


@functools.cache
def _ray_cpu_platform() -> type:
    """vLLM's detected CPU platform class (``CpuPlatform``, or ``ZenCpuPlatform`` on AMD
    with zentorch) with ``ray_device_key = "GPU"``: vLLM's Ray executors then accept the
    CPU platform and place one actor per (fake) Ray GPU; nothing else changes."""
    import importlib

    from vllm.platforms import cpu_platform_plugin

    module, _, name = (cpu_platform_plugin() or "vllm.platforms.cpu.CpuPlatform").rpartition(".")
    base = getattr(importlib.import_module(module), name)
    return type(RAY_CPU_PLATFORM, (base,), {
        "__module__": __name__, "__qualname__": RAY_CPU_PLATFORM,
        "__doc__": f"{base.__name__} that vLLM's Ray executors accept (NEGABLATE_RAY_ON_CPU=1).",
        "ray_device_key": "GPU",
    })


def __getattr__(name: str) -> Any:
    """``RayCpuPlatform`` on first use (PEP 562), so importing the adapter does not import
    vLLM's platform modules; vLLM finds the class by qualname, Ray's pickle by name too."""
    if name == RAY_CPU_PLATFORM:
        return _ray_cpu_platform()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------- engine core
def patch_engine_core() -> None:
    from vllm.v1.engine.core import EngineCore

    from vllm_negablate.engine_hooks import UnknownNeuronSetError

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


def pin_request(request: Any, mirror: EngineCoreMirror) -> str | None:
    """Pin a ``vllm.v1.request.Request`` to its set and re-key its prefix-cache blocks.

    :func:`~vllm_negablate.engine_hooks.pin_set` does the pinning (set name,
    content hash, ``cache_salt``); if the salt changed, the block hashes vLLM
    computed in ``Request.__init__`` are recomputed so they chain on the new
    salt. Returns the set name (None: no ablation); raises
    :class:`~vllm_negablate.engine_hooks.UnknownNeuronSetError`.
    """
    from vllm_negablate.engine_hooks import pin_set

    salt = request.cache_salt
    name = pin_set(request, mirror)
    if request.cache_salt != salt:
        _rehash_blocks(request)
    return name


def _rehash_blocks(request: Any) -> None:
    """Recompute block hashes after changing the salt (they were made in __init__)."""
    hashes = getattr(request, "block_hashes", None)
    if hashes is None or getattr(request, "_block_hasher", None) is None:
        return
    del hashes[:]
    request.update_block_hashes()


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
    settings = get_settings()
    sets_dir = settings.neuron_sets_dir
    if sets_dir:
        for path in sorted(Path(sets_dir).glob("*.json")):
            try:
                runtime.load_set(NeuronSet.load(path))
            except Exception as exc:  # one bad file must not stop the others
                logger.error("vllm_negablate: skipping %s: %s", path, exc)
        default = settings.default_set
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
    forced = get_settings().kernel
    if forced:
        return forced
    if is_cpu_platform() or vllm_config.model_config.enforce_eager:
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


# --------------------------------------------------------------------- speed
# Two patches that make scoring (prompt log-probs of whole prompts) faster
# without changing what it computes; measured side by side in bench/levers.py,
# with their figures in the README ("Scoring speed"). Each can be turned
# off: NEGABLATE_BATCHED_PROMPT_LOGPROBS=0, and vLLM's own
# ``--ir-op-priority '{"rms_norm": "native", "fused_add_rms_norm": "native"}'``.
CPU_NORM_PROVIDER = "negablate_cpu"


def patch_prompt_logprobs() -> None:
    """Prompt log-probs of all requests of a step in a few large products.

    vLLM's ``GPUModelRunner._get_prompt_logprobs_dict`` loops over requests and
    runs the LM head, the log-softmax and the rank count once per request. For
    BLiMP-sized prompts (about 10 tokens, 256 per step) that is 256 thin
    ``[10 x hidden] @ [hidden x vocab]`` products. This replacement does the
    same bookkeeping per request (chunked prefill, preemption, the CPU tensors
    the scheduler reads), then computes the rows of all requests that ask for
    the same number of top log-probs together, in chunks of
    :func:`~vllm_negablate.prompt_logprobs.rows_per_chunk` rows (bounded memory:
    a chunk's float32 scores stay under 128 MiB whatever the vocabulary). The
    functions that compute are vLLM's own (``model.compute_logits``,
    ``Sampler.compute_logprobs`` / ``gather_logprobs``), so the values are the
    same up to the blocking of one matrix product (float32: ~1e-6).
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def _get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
            if not get_settings().batched_prompt_logprobs:
                return original(self, hidden_states, num_scheduled_tokens)
            return _batched_prompt_logprobs(self, hidden_states, num_scheduled_tokens)

        return _get_prompt_logprobs_dict

    _patch(GPUModelRunner, "_get_prompt_logprobs_dict", make)


def _batched_prompt_logprobs(runner, hidden_states, num_scheduled_tokens):
    """vLLM 0.32's ``_get_prompt_logprobs_dict``, with the per-request work batched."""
    import torch

    from vllm_negablate.prompt_logprobs import PromptRows, mark_skipped, rows_from, score_rows
    from vllm_negablate.runtime import PROMPT_LOGPROBS_FROM_KEY

    pending = runner.num_prompt_logprobs
    if not pending:
        return {}
    done: dict = {}
    completed = []
    rows: dict[int, list[PromptRows]] = {}
    for req_id, num_logprobs in pending.items():
        num_tokens = num_scheduled_tokens.get(req_id)
        if num_tokens is None:  # preempted during prefill
            continue
        request = runner.requests[req_id]
        if request.prompt_token_ids is None:  # prompt embeddings: no prompt log-probs
            continue
        num_prompt_tokens = len(request.prompt_token_ids)
        target = request.in_progress_prompt_logprobs_cpu
        if target is None:
            target = _empty_logprobs_tensors(num_prompt_tokens - 1, num_logprobs + 1)
            request.in_progress_prompt_logprobs_cpu = target
        start_idx = request.num_computed_tokens
        start_tok = start_idx + 1
        remaining = num_prompt_tokens - start_tok
        if num_tokens <= remaining:  # a chunk; more tokens follow
            num_logits = num_tokens
        else:  # the last chunk
            num_logits = remaining
            completed.append(req_id)
            done[req_id] = target
        if num_logits <= 0:
            continue
        offset = int(runner.query_start_loc.np[runner.input_batch.req_id_to_index[req_id]])
        wanted = PromptRows(offset=offset, count=num_logits, start=start_idx, target=target,
                            token_ids=request.prompt_token_ids[start_tok:start_tok + num_logits])
        first = _prompt_logprobs_from(request.sampling_params, PROMPT_LOGPROBS_FROM_KEY)
        if first is not None:  # the continuation only: the rows before it are not computed
            wanted, skipped = rows_from(wanted, first - 1)
            mark_skipped(target, start_idx, request.prompt_token_ids[start_tok:start_tok + skipped])
        if wanted is not None:
            rows.setdefault(num_logprobs, []).append(wanted)

    raw_scores = runner.model_config.logprobs_mode in ("raw_logits", "processed_logits")
    for num_logprobs, group in rows.items():
        score_rows(
            hidden_states, group, num_logprobs,
            compute_logits=runner.model.compute_logits,
            compute_scores=(lambda logits: logits.to(torch.float32)) if raw_scores
            else runner.sampler.compute_logprobs,
            gather=runner.sampler.gather_logprobs,
            vocab_size=runner.model_config.get_vocab_size(),
            chunk_rows=get_settings().score_chunk_rows,
        )
    for req_id in completed:
        del pending[req_id]
        runner.requests[req_id].in_progress_prompt_logprobs_cpu = None
    if done:
        runner._sync_device()
    return done


def _prompt_logprobs_from(sampling_params: Any, key: str) -> int | None:
    """The first prompt position a request wants a log-probability for (``key``,
    :data:`~vllm_negablate.runtime.PROMPT_LOGPROBS_FROM_KEY`, in its ``extra_args``), or
    None: all of them. Only :func:`continuation_logprobs` sets it (the middleware refuses
    it from clients: the rows before would be answered as NaN). The key is passed in so
    that this per-request, per-step call imports nothing."""
    extra = getattr(sampling_params, "extra_args", None)
    first = extra.get(key) if isinstance(extra, dict) else None
    return first if isinstance(first, int) and first >= 1 else None


def sampler_logprob_functions():
    """vLLM's ``Sampler.compute_logprobs`` and ``gather_logprobs``, the two functions the
    batched prompt log-probs call per chunk after the LM head (``bench/logprob_tail.py``
    times them alone)."""
    from vllm.v1.sample.sampler import Sampler

    return Sampler.compute_logprobs, Sampler.gather_logprobs


def _empty_logprobs_tensors(num_positions: int, num_columns: int):
    from vllm.v1.outputs import LogprobsTensors

    return LogprobsTensors.empty_cpu(num_positions, num_columns)


def install_cpu_norm_kernel() -> None:
    """RMSNorm through vLLM's compiled CPU kernels instead of PyTorch ops.

    vLLM 0.32 dispatches ``RMSNorm`` through its IR ops (``vllm.ir.ops.rms_norm``,
    ``fused_add_rms_norm``); the C++ provider (``vllm_c``) is registered for GPUs
    only, so on CPU every norm runs as five PyTorch ops with a float32 round trip.
    The CPU build has the same kernels (``torch.ops._C.rms_norm`` /
    ``fused_add_rms_norm``, csrc/cpu/layernorm.cpp): here they become provider
    ``negablate_cpu``, first in the CPU platform's default priority (a user's
    ``--ir-op-priority`` still comes first). Measured: [8192 x 576] bf16 add+norm
    8 ms -> under 1 ms alone; end to end SmolLM2-135M scoring x1.07 in float32, level
    in bf16 (``bench/levers.py``). Outputs equal to 1 bf16 ulp (float32: 3e-6).

    bfloat16 only where the CPU has AVX512-BF16: vLLM loads ``_C`` there, whose float32
    -> bf16 stores round to nearest like PyTorch; its ``_C_AVX2`` / ``_C_AVX512`` builds
    (CPUs without it) *truncate*, which left the residual stream's sums 1 ulp short of
    PyTorch's in about a quarter of elements, all toward zero (a bias, not noise; seen
    on an AVX2 EPYC). There the provider declines bf16 and PyTorch's norm runs.
    """
    if not is_cpu_platform():
        return
    import torch
    from vllm.ir import ops as ir_ops
    from vllm.platforms import current_platform

    current_platform.import_ir_kernels()
    if not (hasattr(torch.ops._C, "rms_norm") and hasattr(torch.ops._C, "fused_add_rms_norm")):
        logger.warning("vllm_negablate: this vLLM CPU build has no C++ RMSNorm; keeping PyTorch's")
        return

    rounds_bf16 = bool(torch.cpu._is_avx512_bf16_supported())

    def kernel_takes(x, weight, epsilon, variance_size=None) -> bool:
        # what csrc/cpu/layernorm.cpp handles: a weight of x's dtype, contiguous rows;
        # bf16 only where the loaded build rounds its bf16 stores (see above)
        return (variance_size is None and weight is not None and weight.dtype == x.dtype
                and x.is_contiguous() and (x.dtype != torch.bfloat16 or rounds_bf16))

    def rms_norm(x, weight, epsilon, variance_size=None):
        out = torch.empty_like(x)
        torch.ops._C.rms_norm(out, x, weight, epsilon)
        return out

    def fused_add_rms_norm(x, x_residual, weight, epsilon, variance_size=None):
        torch.ops._C.fused_add_rms_norm(x, x_residual, weight, epsilon)
        return x, x_residual

    # vLLM infers each impl's schema from real annotations (this module's are strings)
    tensor, maybe_tensor, maybe_int = torch.Tensor, torch.Tensor | None, int | None
    rms_norm.__annotations__ = {"x": tensor, "weight": maybe_tensor, "epsilon": float,
                                "variance_size": maybe_int, "return": tensor}
    fused_add_rms_norm.__annotations__ = {"x": tensor, "x_residual": tensor, "weight": maybe_tensor,
                                          "epsilon": float, "variance_size": maybe_int,
                                          "return": tuple[tensor, tensor]}
    if CPU_NORM_PROVIDER not in ir_ops.rms_norm.impls:
        ir_ops.rms_norm.register_impl(CPU_NORM_PROVIDER, supports_args=kernel_takes)(rms_norm)
    if CPU_NORM_PROVIDER not in ir_ops.fused_add_rms_norm.impls:
        ir_ops.fused_add_rms_norm.register_impl(
            CPU_NORM_PROVIDER, inplace=True,
            supports_args=lambda x, x_residual, weight, epsilon, variance_size=None:
                kernel_takes(x, weight, epsilon, variance_size) and x_residual.is_contiguous())(fused_add_rms_norm)

    platform = type(current_platform)
    if getattr(platform.get_default_ir_op_priority, _PATCHED_ATTR, False):
        return
    original = platform.get_default_ir_op_priority

    def get_default_ir_op_priority(vllm_config):
        priority = original(vllm_config)
        for op in ("rms_norm", "fused_add_rms_norm"):
            current = list(getattr(priority, op))
            setattr(priority, op, [CPU_NORM_PROVIDER] + [p for p in current if p != CPU_NORM_PROVIDER])
        return priority

    setattr(get_default_ir_op_priority, _PATCHED_ATTR, True)
    platform.get_default_ir_op_priority = staticmethod(get_default_ir_op_priority)


def patch_cpu_pipeline_receive_buffer() -> None:
    """Eager CPU workers on pipeline ranks > 0: allocate the buffer they receive into.

    ``GPUModelRunner.intermediate_tensors`` (the hidden states and residual a PP rank
    receives from the previous stage) is allocated in one place only, ``_dummy_run``.
    GPU workers always run it (memory profiling, warm-up, graph capture); vLLM 0.32's
    CPU worker does not in eager mode: ``CPUWorker._should_warm_up_model`` is False
    with ``enforce_eager`` and an explicit KV-cache size, and
    ``CPUModelRunner.warming_up_model`` returns at once under ``CompilationMode.NONE``.
    So the first real step of PP rank 1 dies on ``assert self.intermediate_tensors is
    not None`` (``sync_and_gather_intermediate_tensors``) and the engine with it,
    under ``mp`` and Ray alike, plugin or not (no upstream issue found). After
    ``initialize_kv_cache`` this allocates the buffer exactly as ``_dummy_run`` would;
    the CPU platform only, and a no-op on the first rank or when it exists.
    """
    if not is_cpu_platform():
        return
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    def make(original):
        def initialize_kv_cache(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            allocate_pp_receive_buffer(self)
            return result

        return initialize_kv_cache

    _patch(CPUModelRunner, "initialize_kv_cache", make)


def allocate_pp_receive_buffer(runner: Any) -> bool:
    """Give a PP rank > 0 its receive buffer if it has none; returns whether it allocated."""
    from vllm.distributed import get_pp_group

    if getattr(runner, "intermediate_tensors", None) is not None or get_pp_group().is_first_rank:
        return False
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype, device=runner.device)
    return True


def install() -> None:
    """Apply the process-wide patches (idempotent; safe in every vLLM process)."""
    patch_engine_args()
    patch_engine_core()
    patch_model_loader()
    patch_prompt_logprobs()
    install_cpu_norm_kernel()
    patch_cpu_pipeline_receive_buffer()


# ------------------------------------------------------------ offline engine
def engine_model_path(llm: Any) -> str:
    """The model an offline ``vllm.LLM`` serves (a directory, or a hub id)."""
    return str(llm.llm_engine.model_config.model)


def engine_max_model_len(llm: Any) -> int:
    """The context length an offline ``vllm.LLM`` was started with."""
    return int(llm.llm_engine.model_config.max_model_len)


def engine_dtype(llm: Any) -> str:
    """The dtype an offline ``vllm.LLM`` computes in, e.g. ``"torch.float32"``."""
    return str(llm.llm_engine.model_config.dtype)


def shutdown_llm(llm: Any) -> None:
    """Stop an offline ``vllm.LLM``'s engine core (and its workers) now.

    ``vllm.LLM`` has no public shutdown; without this the engine-core process
    lives until the object is garbage collected. Safe to call twice.
    """
    llm.llm_engine.engine_core.shutdown()


def is_cpu_platform() -> bool:
    """True when vLLM runs on its CPU backend."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


# ------------------------------------------------------------- OpenAI server
def openai_server_env_setup() -> None:
    """What ``vllm serve`` does to the process environment before parsing arguments."""
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()


def openai_server_parser(prog: str, description: str):
    """vLLM's ``vllm serve`` argument parser (every engine and server flag), to add ours to."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog=prog, description=description))


def validate_openai_server_args(args) -> None:
    """vLLM's own checks of parsed ``vllm serve`` arguments."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(args)


def configure_logging(args) -> None:
    """Configure vLLM's logging from the parsed server arguments."""
    from vllm.logger import configure_logging_from_args

    configure_logging_from_args(args)


def openai_api_keys(args) -> list[str]:
    """The API keys the OpenAI server accepts (``--api-key``, else ``VLLM_API_KEY``)."""
    import vllm.envs as envs

    return [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]


RPC = Callable[..., Awaitable[list[Any]]]


async def serve_openai_app(args, customize: Callable[[Any, RPC], Awaitable[None]]) -> None:
    """Start vLLM's OpenAI-compatible server in this process, as ``vllm serve`` does.

    Mirrors vLLM 0.32's ``run_server`` / ``build_and_serve``
    (``vllm/entrypoints/launchers/api_server/entry.py``) with one addition:
    once the engine is up and vLLM's app (including ``args.middleware``) is
    built and its state initialized, ``await customize(app, rpc)`` runs before
    the socket is served. ``app`` is the FastAPI app (add routers, put things
    on ``app.state``); ``await rpc(method, *args)`` calls a worker-extension
    method on every worker and returns their replies.
    """
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    def interrupt(*_):  # as vLLM's run_server: SIGTERM during start-up
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    _listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)

            async def rpc(method: str, *rpc_args):
                return await engine.collective_rpc(method, args=rpc_args)

            await init_app_state(engine, app.state, args, tasks)
            await customize(app, rpc)
            log_config = get_uvicorn_log_config(args)
            shutdown = await serve_http(
                app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host,
                port=args.port, log_level=args.uvicorn_log_level,
                access_log=not args.disable_uvicorn_access_log,
                timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
                ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile,
                ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
                ssl_ciphers=args.ssl_ciphers,
                h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
                h11_max_header_count=args.h11_max_header_count,
                **({"log_config": log_config} if log_config else {}),
            )
        await shutdown
    finally:
        sock.close()


async def continuation_logprobs(
    app_state: Any, token_ids: list[int], first: int, extra_args: dict[str, Any], request_id: str,
) -> list[tuple[float, int]]:
    """(log-probability, rank) of ``token_ids[first:]``, each given the tokens before it,
    from the served engine (``app_state.engine_client``, the one vLLM's routes use).

    One request with ``prompt_logprobs: 0`` and ``max_tokens: 1`` (the prefill's own
    sample; nothing is decoded after it), detokenization off, and
    :data:`~vllm_negablate.runtime.PROMPT_LOGPROBS_FROM_KEY` set to ``first`` so the
    worker computes the LM head only from the row that predicts ``token_ids[first]``.
    ``extra_args`` carries the neuron-set selection exactly as ``vllm_xargs`` does on
    ``/v1/completions`` (the engine pins the set at admission). The rank is vLLM's:
    1 + the number of tokens scored strictly higher, so ties count as the top token,
    as lm_eval's ``is_greedy`` does. Raises what ``EngineClient.generate`` raises
    (``ValueError`` for a prompt longer than the model's context).
    """
    from vllm import SamplingParams, TokensPrompt

    from vllm_negablate.runtime import PROMPT_LOGPROBS_FROM_KEY

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                            extra_args={**extra_args, PROMPT_LOGPROBS_FROM_KEY: int(first)})
    final = None
    async for output in app_state.engine_client.generate(
            TokensPrompt(prompt_token_ids=list(token_ids)), params, request_id):
        final = output
    rows = final.prompt_logprobs if final is not None else None
    if rows is None or len(rows) != len(token_ids):
        raise RuntimeError(f"request {request_id}: the engine returned no prompt log-probabilities")
    out = []
    for position in range(first, len(token_ids)):
        scored = rows[position][token_ids[position]]
        out.append((float(scored.logprob), int(scored.rank)))
    return out


def served_dtype(app_state: Any) -> str:
    """The dtype the served model computes in, e.g. ``"bfloat16"`` (from vLLM's model config)."""
    return str(app_state.openai_serving_models.model_config.dtype).removeprefix("torch.")


def served_limits(app_state: Any) -> tuple[int, int]:
    """The served model's context length and vocabulary size (vLLM's model config):
    what a prompt of token ids must fit."""
    config = app_state.openai_serving_models.model_config
    return int(config.max_model_len), int(config.get_vocab_size())


def serves_model(app_state: Any, name: str) -> bool:
    """Whether ``name`` is a model the server serves (``--served-model-name``), on vLLM's app state."""
    return bool(app_state.openai_serving_models.is_base_model(name))


def extend_model_list(
    app_state: Any,
    *,
    base_fields: Callable[[], dict[str, Any]],
    variants: Callable[[], list[tuple[str, dict[str, Any]]]],
) -> None:
    """Add to ``/v1/models``: fields on each base model's card, and ``BASE@SUFFIX`` cards.

    Both callables are called on every listing. ``base_fields()`` gives extra
    fields for each served model's card; ``variants()`` gives ``(suffix,
    fields)`` pairs, and for each served model ``BASE`` a card ``BASE@suffix``
    (parent ``BASE``, same root and context length) with those extra fields is
    appended.
    """
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    models = app_state.openai_serving_models
    original = models.show_available_models

    async def show_available_models():
        listing = await original()
        extra, more = base_fields(), variants()
        for card in listing.data:
            if models.is_base_model(card.id):
                for key, value in extra.items():
                    setattr(card, key, value)
        for base in models.base_model_paths:
            for suffix, fields in more:
                listing.data.append(ModelCard(
                    id=f"{base.name}@{suffix}", parent=base.name, root=base.model_path,
                    max_model_len=models.model_config.max_model_len,
                    permission=[ModelPermission()], **fields,
                ))
        return listing

    models.show_available_models = show_available_models
