"""The sign-specific ablation op and the activation wrapper that calls it.

``h = clamp(h, lo[slot], hi[slot])`` is applied to the MLP pre-activation
(the gate half for gated MLPs) *before* the activation's own forward, so the
wrapped vLLM op (``SiluAndMul``, ``GeluAndMul``, ``GELU``, ...) and its fused
kernels run unchanged on the clamped input.

The clamp is a registered custom op (``torch.ops.negablate.ablate_``) that
mutates its input in place. Being opaque to Dynamo, its Python body runs on
every call even inside vLLM's compiled graph (CPU default), so it can read the
current step's plan. Two kernels implement it:

* ``sparse`` (default): touches only the ablated columns, per run of tokens
  that share a slot; a step with no ablation costs one Python check per layer.
* ``dense`` (graph-safe): full-width clamp against rows gathered from the
  persistent tables with the persistent per-token slot buffer. It launches the
  same kernels whatever the step holds, so a captured CUDA graph replays it
  correctly. Select it with ``NEGABLATE_KERNEL=dense``; the plugin selects it
  itself when CUDA graphs are on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.library import Library

if TYPE_CHECKING:
    from vllm_negablate.runtime import WorkerRuntime

_RUNTIME: WorkerRuntime | None = None


def set_runtime(runtime: WorkerRuntime | None) -> None:
    """Bind the process's worker runtime; the op reads tables and plan from it."""
    global _RUNTIME
    _RUNTIME = runtime


def get_runtime() -> WorkerRuntime | None:
    return _RUNTIME


def _gate_view(x: torch.Tensor, gated: bool) -> torch.Tensor:
    """2-D [tokens, width] view of the pre-activation part of ``x``."""
    h = x.view(-1, x.shape[-1])
    if gated:
        h = h[:, : h.shape[1] // 2]
    return h


def ablate_sparse_(h: torch.Tensor, table, runs) -> None:
    """Clamp only the ablated columns, run by run (eager fast path)."""
    num_tokens = h.shape[0]
    for slot, start, stop in runs:
        row = table.sparse[slot]
        if row is None or start >= num_tokens:
            continue
        block = h[start:min(stop, num_tokens)]
        sub = block.index_select(1, row.cols)
        torch.clamp(sub, row.lo, row.hi, out=sub)
        block.index_copy_(1, row.cols, sub)


def ablate_dense_(h: torch.Tensor, table, slot_ids: torch.Tensor) -> None:
    """Full-width clamp with per-token rows; same kernels every step (graph-safe)."""
    ids = slot_ids[: h.shape[0]]
    h.clamp_(min=table.lo.index_select(0, ids), max=table.hi.index_select(0, ids))


def ablate_(x: torch.Tensor, layer: int, gated: bool) -> None:
    runtime = _RUNTIME
    if runtime is None:
        return
    runtime.apply(_gate_view(x, gated), layer)


def _ablate_fake(x: torch.Tensor, layer: int, gated: bool) -> None:
    return None


_LIB = Library("negablate", "FRAGMENT")  # noqa: TOR901 - lives as long as the module


def _register_op() -> None:
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:  # plain-torch use (tests of the kernels without vLLM)
        _LIB.define("ablate_(Tensor(a0!) x, int layer, bool gated) -> ()")
        _LIB.impl("ablate_", ablate_, "CompositeExplicitAutograd")
        _LIB._register_fake("ablate_", _ablate_fake)
        return
    direct_register_custom_op(
        op_name="ablate_",
        op_func=ablate_,
        mutates_args=["x"],
        fake_impl=_ablate_fake,
        target_lib=_LIB,
    )


_register_op()


class SignAblatedActivation(nn.Module):
    """Wraps one layer's activation module: clamp the pre-activation, then run it.

    One instance per decoder layer (vLLM may share activation modules between
    layers; the wrapper carries the layer index, the inner module is reused).
    """

    def __init__(self, inner: nn.Module, layer_idx: int, gated: bool) -> None:
        super().__init__()
        self.inner = inner
        self.layer_idx = layer_idx
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.ops.negablate.ablate_(x, self.layer_idx, self.gated)
        return self.inner(x)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, gated={self.gated}"
