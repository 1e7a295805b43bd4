"""Tensor- and pipeline-parallel arithmetic, kept pure so it can be unit-tested.

With tensor parallelism vLLM shards the MLP's intermediate dimension
(``ColumnParallelLinear`` / ``MergedColumnParallelLinear``): rank ``r`` of
``tp`` holds the contiguous neurons ``[r * d / tp, (r + 1) * d / tp)``. For a
gated MLP each rank's fused ``gate_up`` output is ``[gate_local | up_local]``,
so the gate half of the local activation input is exactly that slice.

With pipeline parallelism each rank builds only its own decoder layers but
keeps their *global* index in module names (``model.layers.17.mlp``), so a
neuron set addressed by global layer needs no translation: a rank simply has
no table for the layers it does not own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ShardSpec:
    """Which slice of the intermediate dimension one TP rank holds."""

    tp_rank: int
    tp_size: int
    global_width: int

    def __post_init__(self) -> None:
        if self.tp_size < 1 or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"invalid tensor-parallel rank {self.tp_rank} of {self.tp_size}")
        if self.global_width % self.tp_size:
            raise ValueError(
                f"intermediate size {self.global_width} is not divisible by "
                f"tensor_parallel_size {self.tp_size}"
            )

    @property
    def local_width(self) -> int:
        return self.global_width // self.tp_size

    @property
    def start(self) -> int:
        return self.tp_rank * self.local_width

    @property
    def stop(self) -> int:
        return self.start + self.local_width

    def localize(
        self, neurons: Sequence[int], lo: Sequence[float], hi: Sequence[float]
    ) -> tuple[list[int], list[float], list[float]]:
        """Keep the neurons this rank owns, re-indexed to local coordinates."""
        out_idx: list[int] = []
        out_lo: list[float] = []
        out_hi: list[float] = []
        for n, a, b in zip(neurons, lo, hi, strict=True):
            if self.start <= n < self.stop:
                out_idx.append(n - self.start)
                out_lo.append(a)
                out_hi.append(b)
        return out_idx, out_lo, out_hi


def pipeline_layer_range(num_layers: int, pp_rank: int, pp_size: int) -> range:
    """Global layer indices owned by one pipeline stage, as vLLM partitions them.

    Delegates to ``vllm.distributed.utils.get_pp_indices`` (which honours
    ``VLLM_PP_LAYER_PARTITION``) so the simulation in the tests uses vLLM's own
    rule rather than a copy of it.
    """
    from vllm.distributed.utils import get_pp_indices

    start, stop = get_pp_indices(num_layers, pp_rank, pp_size)
    return range(start, stop)
