"""Methods mixed into every vLLM worker, reached with ``collective_rpc``.

``LLM.collective_rpc("negablate_load_set", args=(neuron_set_json,))`` (or the
async engine client's ``collective_rpc``) runs the method on every TP/PP rank.
Every method returns ``{"ok": bool, "error": str | None, "state": {...}}``
rather than raising, so one bad request never takes a worker down, and the
engine core mirrors ``state`` to pin later requests (see engine_hooks).
All ranks validate against the same fingerprint, so they agree on errors.
"""

from __future__ import annotations

from typing import Any

from vllm_negablate.context import get_runtime
from vllm_negablate.discovery.worker_methods import DiscoveryWorkerMixin
from vllm_negablate.neuron_set import NeuronSet


def _reply(action) -> dict[str, Any]:
    runtime = get_runtime()
    if runtime is None:
        return {"ok": False, "error": "vllm_negablate is not installed in this worker", "state": {}}
    try:
        state = action(runtime)
    except Exception as exc:  # reported, never raised into vLLM's RPC loop
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "state": runtime.state()}
    return {"ok": True, "error": None, "state": state}


class NegablateWorkerExtension(DiscoveryWorkerMixin):
    """Neuron-set control for one worker (``worker_extension_cls``)."""

    def negablate_load_set(self, neuron_set_json: str) -> dict[str, Any]:
        """Make a set resident (JSON text of a NeuronSet); replaces a set of the same name."""
        return _reply(lambda rt: rt.load_set(NeuronSet.model_validate_json(neuron_set_json)))

    def negablate_unload_set(self, name: str) -> dict[str, Any]:
        return _reply(lambda rt: rt.unload_set(name))

    def negablate_set_default(self, name: str | None) -> dict[str, Any]:
        """Set the set used by requests that name none (None: no ablation)."""
        return _reply(lambda rt: rt.set_default(name))

    def negablate_state(self) -> dict[str, Any]:
        return _reply(lambda rt: rt.state())
