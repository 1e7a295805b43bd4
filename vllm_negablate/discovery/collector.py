"""Pre-activation statistics collected inside the model, step by step.

A :class:`PreactivationObserver` is what ``WorkerRuntime.observer`` points to while
discovery runs. The runtime calls :meth:`PreactivationObserver.observe` from the
ablation op of every wrapped layer with ``h`` = the ``[tokens, local_width]``
pre-activation view (the gate half for gated MLPs), *before* any clamp, and with the
step's :class:`~vllm_negablate.step_plan.StepPlan`:

* ``plan is None``: a profile / dummy / warm-up run (no scheduled requests). Ignored.
* rows ``[0:plan.num_tokens]`` are real tokens; anything after is padding. Ignored.

Each layer feeds one :class:`StreamingW1Estimator` over the rank's *local* neurons
(created lazily with the width of the first batch). Memory is bounded: per layer
``(nbins + 2) * 4`` bytes + a few float64 per neuron, plus a warm-up buffer of
``warmup_tokens`` rows that is dropped once the grid is set.

An exception inside the observer never propagates into vLLM's forward pass: it is
recorded (:attr:`PreactivationObserver.error`), the observer stops observing, and the
error is reported by the collect RPC.

Tensor parallelism: rank ``r`` of ``tp`` holds global neurons ``[r*w, (r+1)*w)`` of every
layer. W1, moments and histograms are all per neuron, so shards are combined by
concatenation along the neuron axis (:func:`concat_neuron_shards`,
:func:`merge_tp_states`, :func:`merge_tp_scores`); this is exact.

Wire format: vLLM returns ``collective_rpc`` results from the engine-core process with
msgpack. Without ``VLLM_ALLOW_INSECURE_SERIALIZATION`` a numpy array does *not* come
back as an array (its encoder emits ``(dtype, shape, buffer-index)``, and a large array's
buffer index is meaningless to the receiver), and numpy scalars are rejected.
:func:`to_wire` / :func:`from_wire` therefore turn arrays into
``{"__ndarray__": [dtype, shape, bytes]}`` and numpy scalars into python scalars.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from vllm_negablate import defaults
from vllm_negablate.discovery.streaming import StreamingW1Estimator

logger = logging.getLogger("vllm_negablate")

__all__ = [
    "ObserverConfig",
    "PreactivationObserver",
    "concat_neuron_shards",
    "merge_tp_states",
    "merge_tp_scores",
    "to_wire",
    "from_wire",
]


class ObserverConfig(BaseModel):
    """What to observe and how (JSON-able: sent to the workers by ``observe_start``)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(
        default=None, ge=0, description="Stop after this many tokens per layer (None: no cap)."
    )
    keep_exact: int = Field(
        default=0, ge=0, description="Also keep the first N raw values of every neuron."
    )
    device: str = Field(
        default="auto",
        description="'auto': keep statistics where h lives (GPU stays on GPU); 'cpu': copy h "
        "to CPU first (dtype is kept, so the 16-bit lattice is still detected).",
    )
    layers: list[int] | None = Field(default=None, description="Only these layers (None: all).")
    # StreamingW1Estimator settings
    nbins: int = 2048
    warmup_tokens: int = defaults.WARMUP_TOKENS
    core_scale: float = 1.0
    range_std: float = 1.0e5
    lattice: str | None = "auto"
    chunk_elements: int = 1 << 22
    kernel: Literal["auto", "numba", "torch"] = Field(
        default="auto",
        description="'auto': numba kernels for CPU statistics, torch for CUDA; 'torch': the "
        "reference formulation everywhere (slower on CPU, same scores).",
    )

    def estimator_kwargs(self) -> dict[str, Any]:
        return dict(
            nbins=self.nbins,
            warmup_tokens=self.warmup_tokens,
            core_scale=self.core_scale,
            range_std=self.range_std,
            lattice=self.lattice,
            chunk_elements=self.chunk_elements,
            kernel=self.kernel,
        )


class PreactivationObserver:
    """Per-layer streaming W1 statistics of the pre-activations one worker sees."""

    def __init__(self, config: ObserverConfig | Mapping[str, Any] | None = None, **kwargs: Any):
        if config is None:
            config = ObserverConfig(**kwargs)
        elif not isinstance(config, ObserverConfig):
            config = ObserverConfig(**{**dict(config), **kwargs})
        elif kwargs:
            config = config.model_copy(update=kwargs)
        if config.device not in ("auto", "cpu"):
            raise ValueError(f"device must be 'auto' or 'cpu', got {config.device!r}")
        self.config = config
        self._layers = None if config.layers is None else set(config.layers)
        self.estimators: dict[int, StreamingW1Estimator] = {}
        self.tokens: dict[int, int] = {}
        self.exact: dict[int, torch.Tensor] = {}  # [keep_exact, K] float32, CPU
        self.observed_calls = 0
        self.ignored_calls = 0  # plan None: profile / dummy runs
        self.padding_rows = 0  # rows past plan.num_tokens, summed over calls
        self.error: str | None = None

    # ---------------------------------------------------------------- the hook
    @torch.no_grad()
    def observe(self, layer: int, h: torch.Tensor, plan: Any) -> None:
        """Called by ``WorkerRuntime.apply`` for every layer of every step."""
        if plan is None:
            self.ignored_calls += 1
            return
        if self.error is not None:
            return
        if self._layers is not None and layer not in self._layers:
            return
        try:
            self._observe(layer, h, int(plan.num_tokens))
        except Exception as exc:  # never raise into vLLM's forward pass
            self.error = f"layer {layer}: {type(exc).__name__}: {exc}"
            logger.error("vllm_negablate discovery observer stopped: %s", self.error)

    def _observe(self, layer: int, h: torch.Tensor, num_tokens: int) -> None:
        if h.ndim != 2:
            h = h.reshape(-1, h.shape[-1])
        n = min(num_tokens, h.shape[0])
        self.padding_rows += h.shape[0] - n
        seen = self.tokens.get(layer, 0)
        if self.config.max_tokens is not None:
            n = min(n, self.config.max_tokens - seen)
        if n <= 0:
            return
        self.observed_calls += 1
        x = h[:n]
        if self.config.device == "cpu" and x.device.type != "cpu":
            x = x.to("cpu")
        est = self.estimators.get(layer)
        if est is None:
            est = StreamingW1Estimator(
                int(x.shape[1]), device=x.device, **self.config.estimator_kwargs()
            )
            self.estimators[layer] = est
        warm = self.config.warmup_tokens
        if not est.has_grid and est.count < warm < est.count + n:
            # The grid is fitted to the warm-up buffer when it fills: cut the batch so that
            # the buffer holds exactly the first `warmup_tokens` tokens, whatever the step
            # sizes were (same tokens in the same order -> same grid, same scores).
            cut = warm - est.count
            est.update(x[:cut])
            est.update(x[cut:])
        else:
            est.update(x)
        keep = self.config.keep_exact
        if keep and seen < keep:
            buf = self.exact.get(layer)
            if buf is None:
                buf = self.exact[layer] = torch.empty((keep, x.shape[1]), dtype=torch.float32)
            m = min(n, keep - seen)
            buf[seen : seen + m] = x[:m].to(device="cpu", dtype=torch.float32)
        self.tokens[layer] = seen + n

    # ---------------------------------------------------------------- results
    def memory_bytes(self) -> int:
        """Bytes held by the estimators and the kept exact values."""
        total = sum(e.memory_bytes() for e in self.estimators.values())
        return total + sum(t.numel() * t.element_size() for t in self.exact.values())

    def _exact_arrays(self) -> dict[int, np.ndarray]:
        return {
            layer: buf[: min(self.tokens.get(layer, 0), buf.shape[0])].numpy().copy()
            for layer, buf in self.exact.items()
        }

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": dict(sorted(self.tokens.items())),
            "observed_calls": self.observed_calls,
            "ignored_calls": self.ignored_calls,
            "padding_rows": self.padding_rows,
            "error": self.error,
            "memory_bytes": self.memory_bytes(),
            "config": self.config.model_dump(),
        }

    def state(self) -> dict[str, Any]:
        """Estimator state dicts (numpy) per layer, tokens seen, kept exact values."""
        out = self.summary()
        out["layers"] = {layer: est.state_dict() for layer, est in sorted(self.estimators.items())}
        out["exact"] = self._exact_arrays()
        return out

    def finalize(self) -> dict[str, Any]:
        """Per-layer, per-local-neuron scores (``StreamingW1Estimator.finalize``)."""
        out = self.summary()
        out["layers"] = {layer: est.finalize() for layer, est in sorted(self.estimators.items())}
        out["exact"] = self._exact_arrays()
        return out


# ----------------------------------------------------------------- TP merging
_PER_NEURON_STATE = ("mean", "m2", "m3", "m4", "min", "max", "center", "scale", "hist")
_SHARED_STATE = (
    "nbins", "warmup_tokens", "core_scale", "range_std", "chunk_elements", "lattice",
    "version", "lattice_in_force", "lattice_seen", "count",
)  # fmt: skip


def _scalar(v: Any) -> Any:
    return np.asarray(v).item()


def concat_neuron_shards(shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Estimator state dicts of consecutive neuron shards -> one state over all neurons.

    ``shards`` are in neuron order (TP rank 0 first). All shards must have seen the same
    tokens (same ``count``, same phase: buffering or binned, same warm-up buffer length),
    which is what TP ranks of one model do.
    """
    if not shards:
        raise ValueError("no shards to merge")
    if len(shards) == 1:
        return dict(shards[0])
    first = shards[0]
    for i, sh in enumerate(shards[1:], start=1):
        for key in _SHARED_STATE:
            if key in first and _scalar(sh[key]) != _scalar(first[key]):
                raise ValueError(
                    f"shard {i}: {key}={_scalar(sh[key])!r} differs from shard 0's "
                    f"{_scalar(first[key])!r}; shards did not see the same tokens/settings"
                )
        if ("hist" in sh) != ("hist" in first) or ("buffer" in sh) != ("buffer" in first):
            raise ValueError(f"shard {i} is in another phase (warm-up vs binned) than shard 0")
    out: dict[str, Any] = {k: first[k] for k in _SHARED_STATE if k in first}
    ks = [int(_scalar(s["num_neurons"])) for s in shards]
    if min(ks) < 0:
        raise ValueError("a shard has seen no tokens")
    out["num_neurons"] = sum(ks)
    for key in _PER_NEURON_STATE:
        if key in first:
            out[key] = np.concatenate([np.asarray(s[key]) for s in shards], axis=0)
    if "buffer" in first:
        out["buffer"] = np.concatenate([np.asarray(s["buffer"]) for s in shards], axis=1)
    return out


def _group_by_layer(replies: Iterable[Mapping[str, Any]]) -> dict[int, dict[int, Any]]:
    """{layer: {tp_rank: per-layer payload}}; PP ranks contribute disjoint layers."""
    grouped: dict[int, dict[int, Any]] = {}
    tp_size = None
    for reply in replies:
        size = int(reply.get("tp_size", 1))
        if tp_size is None:
            tp_size = size
        elif size != tp_size:
            raise ValueError(f"replies disagree on tp_size ({tp_size} vs {size})")
        rank = int(reply.get("tp_rank", 0))
        for layer, payload in reply["layers"].items():
            ranks = grouped.setdefault(int(layer), {})
            if rank in ranks:
                raise ValueError(f"layer {layer}: two replies from tp rank {rank}")
            ranks[rank] = payload
    for layer, ranks in grouped.items():
        if sorted(ranks) != list(range(tp_size or 1)):
            raise ValueError(
                f"layer {layer}: replies from tp ranks {sorted(ranks)}, expected 0..{(tp_size or 1) - 1}"
            )
    return dict(sorted(grouped.items()))


def merge_tp_states(replies: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Collect replies (state dicts of local shards) -> {layer: state over global neurons}.

    Rank ``r`` holds global neurons ``[r*w, (r+1)*w)``, so shards are concatenated in rank
    order. Use :meth:`StreamingW1Estimator.from_state_dict` on the result to finalize.
    """
    return {
        layer: concat_neuron_shards([ranks[r] for r in sorted(ranks)])
        for layer, ranks in _group_by_layer(replies).items()
    }


def merge_tp_scores(replies: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, np.ndarray]]:
    """Collect replies (finalized per-neuron arrays) -> {layer: arrays over global neurons}."""
    merged: dict[int, dict[str, np.ndarray]] = {}
    for layer, ranks in _group_by_layer(replies).items():
        parts = [ranks[r] for r in sorted(ranks)]
        merged[layer] = {
            key: np.concatenate([np.asarray(p[key]) for p in parts], axis=0) for key in parts[0]
        }
    return merged


# ----------------------------------------------------------------- wire format
_ND = "__ndarray__"


def to_wire(obj: Any) -> Any:
    """Make ``obj`` msgpack/pickle-safe: arrays -> ``{"__ndarray__": [dtype, shape, bytes]}``."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {_ND: [arr.dtype.str, list(arr.shape), arr.tobytes()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Mapping):
        return {k: to_wire(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_wire(v) for v in obj]
    return obj


def from_wire(obj: Any) -> Any:
    """Inverse of :func:`to_wire` (arrays come back as writable numpy arrays)."""
    if isinstance(obj, Mapping):
        if len(obj) == 1 and _ND in obj:
            dtype, shape, data = obj[_ND]
            return np.frombuffer(bytes(data), dtype=np.dtype(dtype)).reshape(shape).copy()
        return {k: from_wire(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_wire(v) for v in obj]
    return obj
