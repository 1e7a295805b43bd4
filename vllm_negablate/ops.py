"""The sign-specific ablation op and the activation wrapper that calls it.

``h = clamp(h, lo[slot], hi[slot])`` is applied to the *MLP pre-activation*
(TransformerLens: ``blocks.{l}.mlp.hook_pre``): the gate half of the fused
``gate_up_proj`` output for gated MLPs, the input projection's output for
dense ones. It runs *before* the activation's own forward, so the wrapped vLLM
op (``SiluAndMul``, ``GeluAndMul``, ``GELU``, ...) and its fused kernels run
unchanged on the clamped input.

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

As in vLLM's ``activation.py``, a plain-PyTorch ``*_native`` reference sits
beside the fast paths: :func:`clamp_pre_activation_native` *defines* the clamp,
and both kernels, the transformers oracle (:mod:`vllm_negablate.oracle`) and
the tests are held to that one function.

The op finds the worker's state through :mod:`vllm_negablate.context`, so this
module does not depend on :mod:`vllm_negablate.runtime` (which builds on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

import torch
from torch import nn
from torch.library import Library

from vllm_negablate.context import get_runtime

# The one name of the clamped tensor, in TransformerLens's terms (``layer`` is global).
HOOK_POINT: Final[str] = "blocks.{layer}.mlp.hook_pre"


def clamp_pre_activation_native(
    h: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
) -> torch.Tensor:
    """PyTorch-native reference of the clamp: ``min(max(h, lo), hi)``, out of place.

    ``h`` is the MLP pre-activation (``[..., width]``); ``lo``/``hi`` broadcast
    against it: one ``[width]`` row for a whole sequence, or ``[tokens, width]``
    rows for a batch that mixes sets. Untouched neurons carry ``-inf``/``+inf``
    (see :func:`full_width_bounds`), so their values pass through bit for bit;
    NaN bounds (the poison slot) give NaN. Written the most obvious way, with no
    column selection and no in-place writes, so that it can serve as the
    definition the kernels are tested against (vLLM's ``forward_native`` idea).
    """
    return torch.minimum(torch.maximum(h, lo.to(h)), hi.to(h))


def full_width_bounds(
    width: int,
    cols: Sequence[int] | torch.Tensor,
    lo: Sequence[float] | torch.Tensor,
    hi: Sequence[float] | torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[width]`` bound rows from a sparse ``(cols, lo, hi)`` listing (``NeuronSet.layer_bounds``).

    Columns not listed get ``-inf``/``+inf``: the same layout as one row of the
    clamp tables, so the reference and the kernels see the same bounds.
    """
    lo_row = torch.full((width,), -math.inf, dtype=dtype, device=device)
    hi_row = torch.full((width,), math.inf, dtype=dtype, device=device)
    index = torch.as_tensor(cols, dtype=torch.long, device=device)
    lo_row[index] = torch.as_tensor(lo, dtype=dtype, device=device)
    hi_row[index] = torch.as_tensor(hi, dtype=dtype, device=device)
    return lo_row, hi_row


def _gate_view(x: torch.Tensor, gated: bool) -> torch.Tensor:
    """2-D [tokens, width] view of the MLP pre-activation part of ``x`` (the gate half if gated)."""
    h = x.view(-1, x.shape[-1])
    if gated:
        h = h[:, : h.shape[1] // 2]
    return h


def ablate_sparse_(h: torch.Tensor, table, runs) -> None:
    """Clamp only the ablated columns, run by run (eager fast path).

    In place; equal to :func:`clamp_pre_activation_native` with each run's
    table row, because the columns it skips have infinite bounds.
    """
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
    """Full-width clamp with per-token rows; same kernels every step (graph-safe).

    In place; equal to :func:`clamp_pre_activation_native` with the rows of the
    per-token slots.
    """
    ids = slot_ids[: h.shape[0]]
    h.clamp_(min=table.lo.index_select(0, ids), max=table.hi.index_select(0, ids))


def ablate_(x: torch.Tensor, layer: int, gated: bool) -> None:
    """Body of ``torch.ops.negablate.ablate_``: clamp the MLP pre-activation part of ``x``."""
    runtime = get_runtime()
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
    """Wraps one layer's activation module: clamp the MLP pre-activation, then run it.

    Its input ``x`` is the activation's input (for gated MLPs the fused
    ``[gate | up]`` projection output); only the MLP pre-activation part of it
    (``blocks.{l}.mlp.hook_pre``: the gate half, or all of ``x`` for dense
    MLPs) is clamped.

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
        hook = HOOK_POINT.format(layer=self.layer_idx)
        return f"layer={self.layer_idx}, gated={self.gated}, hook_point={hook}"
