"""The error of neuron discovery, shared by the discovery modules.

Raised when cutting corpus windows (:mod:`vllm_negablate.discovery.corpus`: the model has no
start token) and by the engine run (:mod:`vllm_negablate.discovery.pipeline`: statistics
that cannot be trusted). It lives in a module of its own so that the corpus code, which
the engine run imports, does not have to import the engine run back for it.
"""

from __future__ import annotations

__all__ = ["DiscoveryError"]


class DiscoveryError(RuntimeError):
    """Discovery could not produce trustworthy statistics."""
