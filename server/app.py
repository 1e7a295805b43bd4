"""Start vLLM's OpenAI-compatible server with the neuron-set control API, in one process.

vLLM's own server is started by :func:`vllm_negablate.vllm_adapter.serve_openai_app`
(a mirror of vLLM's ``run_server``; every vLLM internal it needs stays in the
adapter) with three additions made here: our middleware goes into
``args.middleware`` before vLLM builds the app; the control router and the
``/v1/negablate/loglikelihood`` route are included into it; and a :class:`SetRegistry` is created once the engine is up (it reads
the model shape from the workers and loads ``--neuron-sets DIR``).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from server.launcher import ensure_worker_slots
from server.loglikelihood import router as loglikelihood_router
from server.registry import DEFAULT_WAIT_TIMEOUT, SetRegistry
from server.routes import router
from server.schemas import LOGLIKELIHOOD_PATH
from vllm_negablate import defaults, vllm_adapter
from vllm_negablate.executors import ExecutorUnavailableError, ray_on_cpu, require_executor_backend
from vllm_negablate.neuron_set import NO_ABLATION
from vllm_negablate.settings import get_settings

logger = logging.getLogger("negablate.server")

MIDDLEWARE = "server.middleware.NegablateMiddleware"

# CPU-friendly defaults, applied only when the user did not pass the flag.
CPU_DEFAULTS = {
    "--kv-cache-memory-bytes": str(defaults.KV_CACHE_MB * 2**20),
}


def _wrap_model_list(state) -> None:
    """List ``BASE@none`` and ``BASE@SET`` for every known set in /v1/models (lm_eval reads it).

    Each card says what it selects (``neuron_set``); the base card also says
    which default set a request naming no set gets now (``negablate_default``),
    so a client can tell "the base model" from "the default" without the admin key,
    and what the engine computes in (``negablate_dtype``): the harness keys its
    score cache by it, so bfloat16 scores never answer for float32. Each ``BASE@SET``
    card gives the set's content hash (``negablate_content_hash``): the harness keys its
    cache by it and sends it with each request, so a set replaced under the same name
    is never answered from the old content's rows, nor mixed into a run. The base card
    names the continuation route (``negablate_loglikelihood``): the harness scores
    through it, copying the rows a minimal pair's sentences share.
    """
    dtype = vllm_adapter.served_dtype(state)
    vllm_adapter.extend_model_list(
        state,
        base_fields=lambda: {"negablate_default": state.negablate.default, "negablate_dtype": dtype,
                             "negablate_loglikelihood": LOGLIKELIHOOD_PATH},
        variants=lambda: [(NO_ABLATION, {"neuron_set": NO_ABLATION})] + [
            (name, {"neuron_set": name, "negablate_content_hash": state.negablate.content_hash(name)})
            for name in sorted(state.negablate.sets)],
    )


async def serve(args) -> None:
    async def customize(app, rpc) -> None:
        app.include_router(router)
        app.include_router(loglikelihood_router)
        registry = SetRegistry(rpc, Path(args.neuron_sets) if args.neuron_sets else None,
                               args.max_sets, wait_timeout=args.set_wait_timeout)
        app.state.negablate = registry
        app.state.negablate_admin_key = args.admin_key or get_settings().admin_key
        app.state.negablate_api_keys = vllm_adapter.openai_api_keys(args)
        _wrap_model_list(app.state)
        await registry.startup()
        if app.state.negablate_admin_key is None:
            logger.warning("no admin key: the control API is read-only (use --admin-key)")

    await vllm_adapter.serve_openai_app(args, customize)


def _with_cpu_defaults(argv: list[str]) -> list[str]:
    if not vllm_adapter.is_cpu_platform():
        return argv
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    if "--gpu-memory-utilization" not in given:
        for flag, value in CPU_DEFAULTS.items():
            if flag not in given:
                extra += [flag, value]
    return argv + extra


def parse_args(argv: list[str]):
    parser = vllm_adapter.openai_server_parser(
        prog="negablate serve",
        description="vLLM's OpenAI-compatible server with sign-specific neuron ablation.",
    )
    group = parser.add_argument_group("negablate")
    group.add_argument("--neuron-sets", default=None, metavar="DIR",
                       help="Directory of NeuronSet JSON files: loaded at start, uploads saved there.")
    group.add_argument("--admin-key", default=None,
                       help="Bearer token for the control API (else NEGABLATE_ADMIN_KEY; none: read-only).")
    group.add_argument("--max-sets", type=int, default=defaults.MAX_RESIDENT_SETS,
                       help="Neuron sets resident on the workers at once. A request for a set that "
                            "is not resident waits in line (FIFO) until a slot frees up: the least "
                            "recently used idle set is unloaded, busy ones are drained first.")
    group.add_argument("--set-wait-timeout", type=float, default=DEFAULT_WAIT_TIMEOUT, metavar="SECONDS",
                       help="How long a request waits for a resident slot (and a DELETE for the "
                            "set's running requests) before it is answered 503 with Retry-After "
                            "(409 for the DELETE).")
    args = parser.parse_args(_with_cpu_defaults(argv))
    if getattr(args, "model_tag", None):
        args.model = args.model_tag  # vLLM's entry point leaves this to its CLI wrapper
    if args.host is None:
        args.host = "127.0.0.1"
    if MIDDLEWARE not in args.middleware:
        args.middleware.append(MIDDLEWARE)
    if args.max_sets < 1 or args.set_wait_timeout <= 0:
        raise SystemExit("--max-sets must be >= 1 and --set-wait-timeout > 0")
    if (args.api_server_count or 1) > 1 or args.headless:
        raise SystemExit("negablate serve runs one API server process (no --api-server-count/--headless)")
    try:
        require_executor_backend(getattr(args, "distributed_executor_backend", None))
    except ExecutorUnavailableError as e:
        raise SystemExit(f"negablate serve: {e}") from None
    vllm_adapter.validate_openai_server_args(args)
    return args


def _executor_context(args) -> contextlib.AbstractContextManager:
    """``--distributed-executor-backend ray`` on CPU: what vLLM needs around the server.

    vLLM's Ray executors refuse its CPU platform; :func:`~vllm_negablate.executors.ray_on_cpu`
    opts in to the plugin's Ray-on-CPU platform, binds one core group per rank and, unless
    ``RAY_ADDRESS`` names a cluster, starts a local Ray head with one fake GPU per rank
    that stops with the server. Anything else (GPUs, ``mp``): nothing to do.
    """
    if args.distributed_executor_backend != "ray" or not vllm_adapter.is_cpu_platform():
        return contextlib.nullcontext()
    world_size = (args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1)
    return ray_on_cpu(world_size)


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvloop

    argv = list(sys.argv[1:] if argv is None else argv)
    vllm_adapter.openai_server_env_setup()
    args = parse_args(argv)
    # Workers need spare slots: a replaced set keeps its old slot until its requests end.
    ensure_worker_slots(os.environ, args.max_sets)
    vllm_adapter.configure_logging(args)
    with _executor_context(args):
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
