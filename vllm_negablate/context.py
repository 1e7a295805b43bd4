"""The process-global worker runtime: who owns it and how the op finds it.

The ablation op is called by vLLM with ``(x, layer, gated)`` only; it cannot be
handed the worker's state, so it reads it from here. This module sits below
both :mod:`vllm_negablate.ops` (which reads the binding on every call) and
:mod:`vllm_negablate.runtime` (whose :class:`~vllm_negablate.runtime.WorkerRuntime`
is what gets bound), and depends on neither: ``runtime`` builds on ``ops``, and
both build on ``context``, with no circle.

``WorkerRuntime`` is named for type checkers only (the import contracts in
pyproject.toml exclude ``TYPE_CHECKING`` imports).

One binding per process is enough: vLLM runs one worker (one TP/PP rank) per
process, and that worker owns exactly one runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm_negablate.runtime import WorkerRuntime

__all__ = ["get_runtime", "set_runtime"]

_RUNTIME: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime | None) -> None:
    """Bind the process's worker runtime (``None`` unbinds: the op becomes a no-op)."""
    global _RUNTIME
    _RUNTIME = runtime


def get_runtime() -> WorkerRuntime | None:
    """The runtime bound by :func:`set_runtime`; ``None`` outside a patched vLLM worker."""
    return _RUNTIME
