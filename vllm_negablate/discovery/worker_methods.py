"""Discovery RPCs mixed into every vLLM worker (``collective_rpc``).

``LLM.collective_rpc("negablate_observe_start", args=(config_json,))`` installs a fresh
:class:`~vllm_negablate.discovery.collector.PreactivationObserver` as the worker
runtime's ``observer``; every following step's real tokens are added to its statistics.
``negablate_observe_stop`` detaches it (the statistics are kept), and
``negablate_observe_collect`` returns them.

Like the neuron-set RPCs, every method returns a dict and never raises::

    {"ok": bool, "error": str | None, "tp_rank": int, "tp_size": int,
     "active": bool, "tokens": {layer: n}, "memory": {...}, "state": runtime.state(),
     "layers": {layer: payload}, "exact": {layer: array}}   # collect only

``layers`` holds, per layer of this rank, the estimator state dict (``finalize=False``)
or the finalized per-neuron arrays (``finalize=True``) of the rank's *local* neurons.
Arrays travel in :func:`~vllm_negablate.discovery.collector.to_wire` form (vLLM's
msgpack encoder does not round-trip numpy arrays by itself); decode with
:func:`~vllm_negablate.discovery.collector.from_wire`.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

from vllm_negablate.context import get_runtime
from vllm_negablate.discovery.collector import ObserverConfig, PreactivationObserver, to_wire

_ATTR = "_negablate_observer"


def process_memory() -> dict[str, int]:
    """Resident memory of this process: current (VmRSS) and peak (VmHWM), in bytes."""
    out = {"rss": -1, "peak_rss": -1}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                out["peak_rss"] = int(line.split()[1]) * 1024
    except OSError:  # not Linux: only the peak is known
        out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def reset_peak_memory() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False if impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class DiscoveryWorkerMixin:
    """Pre-activation statistics RPCs (mixed into ``NegablateWorkerExtension``)."""

    def _negablate_discovery_reply(self, action) -> dict[str, Any]:
        runtime = get_runtime()
        if runtime is None:
            return {"ok": False, "error": "vllm_negablate is not installed in this worker",
                    "tp_rank": 0, "tp_size": 1, "active": False}
        reply: dict[str, Any] = {"ok": True, "error": None, "tp_rank": runtime.tp_rank,
                                 "tp_size": runtime.tp_size}
        try:
            reply.update(action(runtime))
        except Exception as exc:  # reported, never raised into vLLM's RPC loop
            reply["ok"], reply["error"] = False, f"{type(exc).__name__}: {exc}"
        observer = getattr(self, _ATTR, None)
        reply["active"] = observer is not None and runtime.observer is observer
        if observer is not None:
            reply["tokens"] = dict(sorted(observer.tokens.items()))
            if observer.error and reply["ok"]:
                reply["ok"], reply["error"] = False, f"observer failed: {observer.error}"
        memory = {**process_memory(), "observer_bytes": observer.memory_bytes() if observer else 0}
        memory.update(reply.get("memory") or {})  # collect(clear=True) measured before clearing
        reply["memory"] = memory
        reply["state"] = runtime.state()
        return reply

    def negablate_observe_start(self, config_json: str = "{}") -> dict[str, Any]:
        """Start collecting with a fresh observer (``ObserverConfig`` as JSON text).

        Extra key ``"reset_peak_memory": true`` resets the process's peak-RSS counter.
        """

        def start(runtime) -> dict[str, Any]:
            raw = json.loads(config_json or "{}")
            reset = bool(raw.pop("reset_peak_memory", False))
            observer = PreactivationObserver(ObserverConfig.model_validate(raw))
            setattr(self, _ATTR, observer)
            runtime.observer = observer
            return {"peak_reset": reset_peak_memory() if reset else False}

        return self._negablate_discovery_reply(start)

    def negablate_observe_stop(self) -> dict[str, Any]:
        """Detach the observer; its statistics stay available to collect."""

        def stop(runtime) -> dict[str, Any]:
            if getattr(self, _ATTR, None) is None:
                raise RuntimeError("no observer was started (negablate_observe_start)")
            if runtime.observer is getattr(self, _ATTR):
                runtime.observer = None
            return {}

        return self._negablate_discovery_reply(stop)

    def negablate_observe_collect(
        self, finalize: bool = False, clear: bool = False
    ) -> dict[str, Any]:
        """This rank's statistics: estimator states, or per-neuron scores if ``finalize``.

        Finalizing here is exact (scores are per neuron, so TP shards finalize
        independently) and sends ~10 floats per neuron instead of the histograms.
        ``clear`` drops the observer afterwards (and detaches it if still running).
        """

        def collect(runtime) -> dict[str, Any]:
            observer: PreactivationObserver | None = getattr(self, _ATTR, None)
            if observer is None:
                raise RuntimeError("no observer was started (negablate_observe_start)")
            data = observer.finalize() if finalize else observer.state()
            out = {
                "finalized": bool(finalize),
                "layers": to_wire(data["layers"]),
                "exact": to_wire(data["exact"]),
                "summary": to_wire(observer.summary()),
                "tokens": dict(sorted(observer.tokens.items())),
                "memory": {"observer_bytes": observer.memory_bytes()},
            }
            if clear:
                if runtime.observer is observer:
                    runtime.observer = None
                setattr(self, _ATTR, None)
            return out

        return self._negablate_discovery_reply(collect)
