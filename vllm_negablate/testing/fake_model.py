"""A torch-only stand-in with vLLM's MLP layout, for tests that need no engine.

``layers.N.mlp`` has a fused ``gate_up_proj`` exposing
``output_size_per_partition`` (as vLLM's MergedColumnParallelLinear does) and
an ``act_fn`` whose class name ends in ``AndMul``; its forward returns each
layer's activation output, so the effect of the clamp is directly visible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_negablate.neuron_set import ModelFingerprint


class SiluAndMul(nn.Module):
    def forward(self, x):
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


class ColumnLinear(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.output_size_per_partition = weight.shape[0]

    def forward(self, x):
        return x @ self.weight.T, None


class GatedMLP(nn.Module):
    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = ColumnLinear(torch.cat([w_gate, w_up]))
        self.act_fn = SiluAndMul()

    def forward(self, x):
        h, _ = self.gate_up_proj(x)
        return self.act_fn(h)


class Layer(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp


class FakeModel(nn.Module):
    """``weights[i] = (w_gate [W, H], w_up [W, H])``; optionally one TP shard or some layers."""

    def __init__(self, weights, tp_rank: int = 0, tp_size: int = 1, layers=None) -> None:
        super().__init__()
        width = weights[0][0].shape[0]
        d = width // tp_size
        sl = slice(tp_rank * d, (tp_rank + 1) * d)
        owned = range(len(weights)) if layers is None else layers
        self.layers = nn.ModuleDict(
            {str(i): Layer(GatedMLP(weights[i][0][sl], weights[i][1][sl])) for i in owned}
        )

    def forward(self, x):
        return {int(i): layer.mlp(x) for i, layer in self.layers.items()}


def random_weights(num_layers: int, width: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(width, hidden, generator=g), torch.randn(width, hidden, generator=g))
            for _ in range(num_layers)]


def fake_fingerprint(num_layers: int, width: int) -> ModelFingerprint:
    return ModelFingerprint(architecture="Fake", num_layers=num_layers, intermediate_size=width)
