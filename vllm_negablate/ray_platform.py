"""Opt-in: vLLM's Ray executor on the CPU platform (``NEGABLATE_RAY_ON_CPU=1``).

vLLM 0.32 refuses Ray on CPU: ``CpuPlatform.ray_device_key`` is ``""`` and both Ray
executors stop on it, in the engine core (``ValueError: current platform cpu does
not support ray.``, ``initialize_ray_cluster``) and again in every Ray actor
(``RuntimeError``, ``get_node_and_physical_gpu_ids``). Upstream: vLLM issues #21602
and #15266, closed unfixed. Nothing else in the CPU worker cares about Ray: with the
key set to ``"GPU"`` and a Ray node that declares fake GPUs (one per rank; they only
drive placement, the actors run vLLM's CPU worker), TP and PP run and match the
oracle.

The key must be right in every process that asks, Ray's actors included, and the
actors ask while they import vLLM, before any ``vllm.general_plugins`` entry point
runs. The one hook vLLM resolves first in every process is the platform itself, so
:func:`register` is a ``vllm.platform_plugins`` entry point. It answers None (no
opinion: vLLM keeps the builtin platform it detects) unless the variable is set *and*
vLLM's own detection finds a CPU platform; then it names a subclass of that platform
whose only change is the key (:func:`vllm_negablate.vllm_adapter.ray_cpu_platform_qualname`),
which vLLM prefers to its builtin one. So installing the project changes nothing for
anyone who does not set the variable, and setting it on a GPU machine changes nothing.

Limits, from vLLM's resolution (``vllm/platforms/__init__.py``): with
``VLLM_TARGET_DEVICE=cpu`` vLLM skips platform plugins altogether; ``VLLM_PLUGINS``,
when set, must name ``negablate_ray_cpu``; another out-of-tree platform plugin that
activates too makes vLLM refuse both. How the variable reaches each process:
:mod:`vllm_negablate.executors`.
"""

from __future__ import annotations

from vllm_negablate.executors import ray_on_cpu_requested

__all__ = ["ENTRY_POINT_NAME", "register"]

ENTRY_POINT_NAME = "negablate_ray_cpu"  # pyproject: [project.entry-points."vllm.platform_plugins"]


def register() -> str | None:
    """Entry point of the ``vllm.platform_plugins`` group: a platform class's qualname, or None.

    Runs inside vLLM's platform resolution, in every vLLM process (Ray actors
    included): with the variable unset it imports nothing and answers None.
    """
    if not ray_on_cpu_requested():
        return None
    from vllm_negablate import vllm_adapter

    return vllm_adapter.ray_cpu_platform_qualname()
