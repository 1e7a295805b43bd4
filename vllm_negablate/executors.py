"""The vLLM executor backends the plugin runs under, and a clear error for a missing one.

vLLM runs its workers with the ``mp`` executor on one machine (the default) or with
``ray`` across machines. Ray is an optional extra of this project (``pip install
'vllm-negablate[ray]'``): without it vLLM fails deep inside engine start-up, after the
model has been read, with an import error that does not say what to install. Commands
that take ``--distributed-executor-backend`` check it first (:func:`require_executor_backend`).
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_FOR_BACKEND", "ExecutorUnavailableError", "require_executor_backend"]

# backend -> (the module it needs, the extra of this project that installs it)
EXTRA_FOR_BACKEND = {"ray": ("ray", "ray")}


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
