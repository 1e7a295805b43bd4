"""The process-global worker runtime: who owns it and how the op finds it.

The ablation op is called by vLLM with ``(x, layer, gated)`` only; it cannot be
handed the worker's state, so it reads it from here. This module sits below
both :mod:`vllm_negablate.ops` (which reads the binding on every call) and
:mod:`vllm_negablate.runtime` (whose :class:`~vllm_negablate.runtime.WorkerRuntime`
is what gets bound), and depends on neither: ``runtime`` builds on ``ops``, and
both build on ``context``, with no circle.

It names no sibling module, not even for type checking: what the op needs is
typed structurally (:class:`AblationRuntime`); ``WorkerRuntime`` provides it.

One binding per process is enough: vLLM runs one worker (one TP/PP rank) per
process, and that worker owns exactly one runtime.
"""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["AblationRuntime", "get_runtime", "set_runtime"]


class AblationRuntime(Protocol):
    """What the op calls on the bound runtime (``WorkerRuntime`` implements it)."""

    def apply(self, h: Any, layer: int) -> None:
        """Clamp one layer's MLP pre-activation ``h`` in place for the current step."""


_RUNTIME: Any = None  # a WorkerRuntime; Any, so callers may use its whole interface


def set_runtime(runtime: AblationRuntime | None) -> None:
    """Bind the process's worker runtime (``None`` unbinds: the op becomes a no-op)."""
    global _RUNTIME
    _RUNTIME = runtime


def get_runtime() -> Any:
    """The runtime bound by :func:`set_runtime`; ``None`` outside a patched vLLM worker."""
    return _RUNTIME
