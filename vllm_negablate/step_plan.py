"""Which slot each token of one model step is computed with.

vLLM flattens a step's tokens request by request, in the order of the
persistent batch (``input_batch.req_ids``), each request contributing
``num_scheduled_tokens[req_id]`` consecutive tokens. A plan turns that layout
plus each request's pinned slot into *runs* ``(slot, start, stop)``: maximal
ranges of consecutive tokens that share a slot. Runs of slot 0 are dropped:
those tokens need no work.

The plan also fills a persistent per-token slot buffer, used by the dense
(graph-safe) kernel, so that a captured graph reading the buffer sees the
current step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from vllm_negablate.tables import NO_ABLATION_SLOT


@dataclass(frozen=True)
class StepPlan:
    num_tokens: int
    runs: tuple[tuple[int, int, int], ...] = field(default_factory=tuple)

    @property
    def is_noop(self) -> bool:
        return not self.runs

    @property
    def uniform_slot(self) -> int | None:
        """The one slot used by every token, if the whole step shares one."""
        if not self.runs:
            return NO_ABLATION_SLOT
        if len(self.runs) == 1 and self.runs[0][1] == 0 and self.runs[0][2] == self.num_tokens:
            return self.runs[0][0]
        return None

    @classmethod
    def build(
        cls,
        req_ids: Sequence[str],
        num_scheduled_tokens: Mapping[str, int],
        slot_of_request: Mapping[str, int],
    ) -> StepPlan:
        runs: list[tuple[int, int, int]] = []
        pos = 0
        for req_id in req_ids:
            n = int(num_scheduled_tokens.get(req_id, 0))
            if n <= 0:
                continue
            slot = slot_of_request.get(req_id, NO_ABLATION_SLOT)
            if slot != NO_ABLATION_SLOT:
                if runs and runs[-1][0] == slot and runs[-1][2] == pos:
                    runs[-1] = (slot, runs[-1][1], pos + n)
                else:
                    runs.append((slot, pos, pos + n))
            pos += n
        return cls(num_tokens=pos, runs=tuple(runs))

    def fill_slot_buffer(self, buffer: torch.Tensor) -> None:
        """Write the per-token slots into a persistent buffer (rest = slot 0)."""
        buffer.zero_()
        for slot, start, stop in self.runs:
            buffer[start:stop] = slot
