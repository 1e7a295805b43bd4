"""Start vLLM's OpenAI-compatible server with the neuron-set control API, in one process.

This mirrors vLLM 0.32's ``run_server`` / ``build_and_serve``
(``vllm/entrypoints/launchers/api_server/entry.py``) with three additions:
our middleware goes into ``args.middleware`` before ``build_app``; the control
router is included after it; and a :class:`SetRegistry` is created once the
engine is up (it reads the model shape from the workers and loads
``--neuron-sets DIR``).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

from server.launcher import worker_slots
from server.registry import DEFAULT_WAIT_TIMEOUT, SetRegistry
from server.routes import router
from vllm_negablate.neuron_set import NO_ABLATION

logger = logging.getLogger("negablate.server")

MIDDLEWARE = "server.middleware.NegablateMiddleware"

# CPU-friendly defaults, applied only when the user did not pass the flag.
CPU_DEFAULTS = {
    "--kv-cache-memory-bytes": str(512 * 2**20),
}


def _wrap_model_list(state) -> None:
    """List ``BASE@none`` and ``BASE@SET`` for every known set in /v1/models (lm_eval reads it).

    Each card says what it selects (``neuron_set``); the base card also says
    which default set a request naming no set gets now (``negablate_default``),
    so a client can tell "the base model" from "the default" without the admin key.
    """
    from vllm.entrypoints.serve.engine.protocol import ModelCard, ModelPermission

    models = state.openai_serving_models
    original = models.show_available_models

    async def show_available_models():
        listing = await original()
        registry = state.negablate
        for card in listing.data:
            if models.is_base_model(card.id):
                card.negablate_default = registry.default
        for base in models.base_model_paths:
            for name in [NO_ABLATION, *sorted(registry.sets)]:
                listing.data.append(ModelCard(
                    id=f"{base.name}@{name}", parent=base.name, root=base.model_path,
                    max_model_len=models.model_config.max_model_len,
                    permission=[ModelPermission()], neuron_set=name,
                ))
        return listing

    models.show_available_models = show_available_models


async def serve(args) -> None:
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http, setup_server
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    def interrupt(*_):  # as vLLM's run_server: SIGTERM during start-up
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    listen_address, sock = setup_server(args, reuse_port=False)
    try:
        async with build_async_engine_client(args) as engine:
            tasks = await engine.get_supported_tasks()
            app = build_app(args, tasks, engine.model_config)
            app.include_router(router)

            async def rpc(method: str, *rpc_args):
                return await engine.collective_rpc(method, args=rpc_args)

            registry = SetRegistry(rpc, Path(args.neuron_sets) if args.neuron_sets else None,
                                   args.max_sets, wait_timeout=args.set_wait_timeout)
            app.state.negablate = registry
            app.state.negablate_admin_key = args.admin_key or os.environ.get("NEGABLATE_ADMIN_KEY") or None
            keys = [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]
            app.state.negablate_api_keys = keys
            await init_app_state(engine, app.state, args, tasks)
            _wrap_model_list(app.state)
            await registry.startup()
            if app.state.negablate_admin_key is None:
                logger.warning("no admin key: the control API is read-only (use --admin-key)")
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


def _with_cpu_defaults(argv: list[str]) -> list[str]:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return argv
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    extra: list[str] = []
    if "--gpu-memory-utilization" not in given:
        for flag, value in CPU_DEFAULTS.items():
            if flag not in given:
                extra += [flag, value]
    return argv + extra


def parse_args(argv: list[str]):
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(
        prog="negablate serve",
        description="vLLM's OpenAI-compatible server with sign-specific neuron ablation.",
    ))
    group = parser.add_argument_group("negablate")
    group.add_argument("--neuron-sets", default=None, metavar="DIR",
                       help="Directory of NeuronSet JSON files: loaded at start, uploads saved there.")
    group.add_argument("--admin-key", default=None,
                       help="Bearer token for the control API (else NEGABLATE_ADMIN_KEY; none: read-only).")
    group.add_argument("--max-sets", type=int, default=8,
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
    validate_parsed_serve_args(args)
    return args


def main(argv: list[str] | None = None) -> None:
    import sys

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    argv = list(sys.argv[1:] if argv is None else argv)
    cli_env_setup()
    args = parse_args(argv)
    # Workers need spare slots: a replaced set keeps its old slot until its requests end.
    os.environ.setdefault("NEGABLATE_MAX_SETS", str(worker_slots(args.max_sets)))
    configure_logging_from_args(args)
    uvloop.run(serve(args))


if __name__ == "__main__":
    main()
