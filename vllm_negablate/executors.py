"""The vLLM executor backends the plugin runs under: a clear error for a missing one, Ray on CPU.

vLLM runs its workers with the ``mp`` executor on one machine (the default) or with
``ray`` across machines. Ray is an optional extra of this project (``pip install
'vllm-negablate[ray]'``): without it vLLM fails deep inside engine start-up, after the
model has been read, with an import error that does not say what to install. Commands
that take ``--distributed-executor-backend`` check it first (:func:`require_executor_backend`).

On GPUs vLLM runs Ray by itself. On its CPU platform vLLM 0.32 refuses Ray (issue
#21602); three things make it work, all done here for ``negablate serve`` and for an
offline ``vllm.LLM`` (:func:`ray_on_cpu`, :func:`local_ray_cpu_node`):

* ``NEGABLATE_RAY_ON_CPU=1`` in the engine's environment: the platform plugin
  (:mod:`vllm_negablate.ray_platform`) then gives vLLM a CPU platform its Ray executors
  accept, and the adapter forwards the variable to the Ray actors;
* a Ray cluster that declares one (fake) GPU per rank: vLLM places one actor per GPU
  bundle, and the actors run vLLM's CPU worker. Without ``RAY_ADDRESS`` vLLM's engine
  core would start a Ray instance of its own, with no GPUs, and wait for a placement
  that never comes; so a local head is started here, or the user's cluster is named
  by ``RAY_ADDRESS`` (``ray start --head --num-gpus N``);
* one core group per rank (``VLLM_CPU_OMP_THREADS_BIND="0|1"``), as under ``mp``:
  vLLM's automatic binding wants one NUMA node per local rank.

This module is imported by the adapter, itself imported while vLLM resolves its
platform, so it imports nothing heavy at the top (``ray`` is imported where used).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator, Mapping, Sequence

__all__ = [
    "ENV_CPU_BIND", "ENV_RAY_ADDRESS", "EXTRA_FOR_BACKEND", "ExecutorUnavailableError", "RAY_ON_CPU_ENV",
    "cpu_rank_binding", "local_ray_cpu_node", "ray_on_cpu", "ray_on_cpu_requested", "require_executor_backend",
]

# backend -> (the module it needs, the extra of this project that installs it)
EXTRA_FOR_BACKEND = {"ray": ("ray", "ray")}

RAY_ON_CPU_ENV = "NEGABLATE_RAY_ON_CPU"
ENV_CPU_BIND = "VLLM_CPU_OMP_THREADS_BIND"
ENV_RAY_ADDRESS = "RAY_ADDRESS"
_OFF = ("", "0", "false", "no", "off")


class ExecutorUnavailableError(RuntimeError):
    """The executor backend asked for needs a package that is not installed."""


def require_executor_backend(backend: str | None) -> None:
    """Raise :class:`ExecutorUnavailableError` naming the extra to install when ``backend``
    needs a package this environment lacks; any other backend (``mp``, ``uni``, None) passes."""
    if backend not in EXTRA_FOR_BACKEND:
        return
    module, extra = EXTRA_FOR_BACKEND[backend]
    if importlib.util.find_spec(module) is None:
        raise ExecutorUnavailableError(
            f"--distributed-executor-backend {backend} needs the {module!r} package, which is not "
            f"installed: pip install 'vllm-negablate[{extra}]' (or pip install 'ray>=2.48'), "
            f"then start a Ray cluster (ray start --head) or let vLLM start a local one")


def ray_on_cpu_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``NEGABLATE_RAY_ON_CPU`` asks for Ray on CPU (any value but empty/0/false/no/off).

    Read from the environment, not :mod:`vllm_negablate.settings`: it is asked while
    vLLM resolves its platform, in every vLLM process, and must cost nothing.
    """
    value = (os.environ if environ is None else environ).get(RAY_ON_CPU_ENV, "")
    return value.strip().lower() not in _OFF


def cpu_rank_binding(world_size: int, cores: Sequence[int]) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` that gives each of ``world_size`` local ranks its own cores.

    Equal contiguous groups (``[0, 1]``, 2 ranks: ``"0|1"``; ``[0..5]``, 2 ranks:
    ``"0,1,2|3,4,5"``); a remainder of cores stays free for the engine core and the
    front end. None when there are fewer cores than ranks (vLLM's own choice then).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    cores = sorted(cores)
    per_rank = len(cores) // world_size
    if per_rank == 0:
        return None
    groups = [cores[i * per_rank:(i + 1) * per_rank] for i in range(world_size)]
    return "|".join(",".join(map(str, group)) for group in groups)


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    """Set (None: remove) variables of this process for the block; restore them after."""
    saved = {key: os.environ.get(key) for key in changes}
    try:
        _apply(changes)
        yield
    finally:
        _apply(saved)


def _apply(values: Mapping[str, str | None]) -> None:
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def local_ray_cpu_node(num_gpus: int, *, num_cpus: int | None = None) -> Iterator[str]:
    """A one-node Ray cluster in this process for vLLM's CPU workers; yields its GCS address.

    Declares ``num_gpus`` fake GPUs (one per rank of the engines that run at once; they
    only drive placement) and ``num_cpus`` (default: this process's cores). For the
    block, ``RAY_ADDRESS`` names the node, so the engine core (a child process) joins it
    instead of starting its own, and ``NEGABLATE_RAY_ON_CPU=1`` is set, before the node
    starts, so Ray's worker processes inherit it. On exit ``ray.shutdown()`` stops the
    node and its workers, and the environment is restored.

    Known leak (vLLM's, not the plugin's): ``RayExecutorV2.shutdown`` kills its actors
    (``ray.kill``), so each Ray engine leaves its workers' shared-memory segments in
    ``/dev/shm`` (``*-cpushm_N`` of the CPU communicator, 4 MiB each, and ``psm_*``
    message queues); ``mp`` workers unlink theirs.
    """
    import ray

    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process: use that cluster "
                           "(RAY_ADDRESS) instead of starting a local node")
    usage_stats = os.environ.get("RAY_USAGE_STATS_ENABLED", "0")
    with _environment({RAY_ON_CPU_ENV: "1", ENV_RAY_ADDRESS: None, "RAY_USAGE_STATS_ENABLED": usage_stats}):
        # "local": a new node even where `ray start` left one to auto-detect
        ray.init(address="local", num_cpus=num_cpus or len(_cores()), num_gpus=num_gpus,
                 include_dashboard=False)
        try:
            address = ray.get_runtime_context().gcs_address
            os.environ[ENV_RAY_ADDRESS] = address
            yield address
        finally:
            ray.shutdown()


@contextlib.contextmanager
def ray_on_cpu(world_size: int) -> Iterator[str]:
    """Everything one vLLM engine of ``world_size`` ranks needs to run under Ray on CPU.

    For the block: ``NEGABLATE_RAY_ON_CPU=1``; ``VLLM_CPU_OMP_THREADS_BIND`` from
    :func:`cpu_rank_binding` unless already set (multi-node: set it on each node, vLLM
    forwards the driver's value only where a node has none); and the cluster:
    ``RAY_ADDRESS`` if set (``host:port``, or ``auto`` for the one ``ray start`` left
    on this machine; its nodes must declare GPUs, ``ray start --num-gpus N``), else a
    new local node with ``world_size`` fake GPUs (:func:`local_ray_cpu_node`), stopped
    on exit. Yields the cluster's address. ``negablate serve`` wraps its server in
    this when asked for ``--distributed-executor-backend ray`` on CPU.
    """
    changes: dict[str, str | None] = {RAY_ON_CPU_ENV: "1"}
    if not os.environ.get(ENV_CPU_BIND):
        binding = cpu_rank_binding(world_size, _cores())
        if binding is not None:
            changes[ENV_CPU_BIND] = binding
    with _environment(changes):
        address = os.environ.get(ENV_RAY_ADDRESS)
        if address:
            yield address
        else:
            with local_ray_cpu_node(world_size) as address:
                yield address
