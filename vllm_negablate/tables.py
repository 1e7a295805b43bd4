"""Per-layer clamp tables: the only state the ablation op reads.

Every wrapped layer owns two preallocated tensors ``lo`` and ``hi`` of shape
``[num_slots, local_width]``. Row ``s`` holds the clamp bounds of the neuron
set loaded in slot ``s``: ``-inf``/``+inf`` for untouched neurons, ``0`` on the
removed side for ablated ones. Slot 0 is "no ablation" and never written.
The last slot is the *poison* slot (NaN bounds): a request whose neuron set
vanished before it was scheduled is computed with it, so that its answer is
visibly broken (NaN log-probabilities) instead of silently unablated.

Tables are written in place (``copy_``/``fill_``) and never reallocated, so a
compiled graph or a captured CUDA graph that read them keeps seeing the
current values. A sparse view (indices + bounds of the ablated neurons only)
is kept beside each row for the eager fast path, where clamping 1% of the
columns is much cheaper than a full-width clamp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vllm_negablate.neuron_set import NeuronSet
from vllm_negablate.sharding import ShardSpec

NO_ABLATION_SLOT = 0


@dataclass
class SparseRow:
    """The ablated neurons of one (layer, slot): local indices and bounds."""

    cols: torch.Tensor  # int64 [k]
    lo: torch.Tensor  # [k], model dtype
    hi: torch.Tensor  # [k]


class LayerTable:
    """Clamp bounds of one decoder layer for every slot (this rank's shard)."""

    def __init__(
        self, num_slots: int, shard: ShardSpec, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shard = shard
        width = shard.local_width
        self.lo = torch.full((num_slots, width), -math.inf, dtype=dtype, device=device)
        self.hi = torch.full((num_slots, width), math.inf, dtype=dtype, device=device)
        self.sparse: list[SparseRow | None] = [None] * num_slots

    def write(self, slot: int, neurons: list[int], lo: list[float], hi: list[float]) -> None:
        """Set one slot's bounds from *global* neuron indices (sharded here)."""
        idx, lo_l, hi_l = self.shard.localize(neurons, lo, hi)
        self.clear(slot)
        if not idx:
            return
        device, dtype = self.lo.device, self.lo.dtype
        cols = torch.tensor(idx, dtype=torch.long, device=device)
        lo_t = torch.tensor(lo_l, dtype=dtype, device=device)
        hi_t = torch.tensor(hi_l, dtype=dtype, device=device)
        self.lo[slot].index_copy_(0, cols, lo_t)
        self.hi[slot].index_copy_(0, cols, hi_t)
        self.sparse[slot] = SparseRow(cols=cols, lo=lo_t, hi=hi_t)

    def poison(self, slot: int) -> None:
        self.lo[slot].fill_(math.nan)
        self.hi[slot].fill_(math.nan)
        cols = torch.arange(self.shard.local_width, device=self.lo.device)
        nan = torch.full((self.shard.local_width,), math.nan, dtype=self.lo.dtype, device=self.lo.device)
        self.sparse[slot] = SparseRow(cols=cols, lo=nan, hi=nan.clone())

    def clear(self, slot: int) -> None:
        self.lo[slot].fill_(-math.inf)
        self.hi[slot].fill_(math.inf)
        self.sparse[slot] = None


class AblationTables:
    """All layer tables of one worker, plus slot bookkeeping.

    ``num_user_slots`` sets can be resident at once; the table has two more
    rows: slot 0 (no ablation) and the poison slot.
    """

    def __init__(
        self,
        layer_shards: dict[int, ShardSpec],
        num_user_slots: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_user_slots < 1:
            raise ValueError("num_user_slots must be >= 1")
        self.num_user_slots = num_user_slots
        self.num_slots = num_user_slots + 2
        self.poison_slot = self.num_slots - 1
        device = torch.device(device)
        self.layers: dict[int, LayerTable] = {
            layer: LayerTable(self.num_slots, shard, dtype, device)
            for layer, shard in sorted(layer_shards.items())
        }
        for table in self.layers.values():
            table.poison(self.poison_slot)

    @property
    def user_slots(self) -> range:
        return range(1, self.num_user_slots + 1)

    def write_set(self, slot: int, neuron_set: NeuronSet) -> None:
        """Fill one slot from a (validated) set; layers this rank lacks are skipped."""
        if slot not in self.user_slots:
            raise ValueError(f"slot {slot} is not a user slot ({self.user_slots})")
        for layer, table in self.layers.items():
            idx, lo, hi = neuron_set.layer_bounds(layer)
            table.write(slot, idx, lo, hi)

    def clear_slot(self, slot: int) -> None:
        if slot not in self.user_slots:
            raise ValueError(f"slot {slot} is not a user slot ({self.user_slots})")
        for table in self.layers.values():
            table.clear(slot)

    def active_columns(self, slot: int) -> dict[int, int]:
        """Number of ablated neurons per owned layer in one slot (for state reports)."""
        return {
            layer: int(t.sparse[slot].cols.numel())
            for layer, t in self.layers.items()
            if t.sparse[slot] is not None
        }
