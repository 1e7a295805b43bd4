"""Per-worker ablation state: resident neuron sets, request pinning, step plans.

One :class:`WorkerRuntime` lives in each vLLM worker process (one per TP/PP
rank). It owns the clamp tables of the layers that rank holds and decides,
each step, which slot every token uses.

Invariants that keep answers unmixed:

* A slot's content never changes while a request uses it. Loading a set
  always fills a *free* slot; the name is then re-pointed at the new slot in
  one assignment. The old slot is recycled only once no in-flight request is
  pinned to it.
* A request is pinned to a slot the first time the worker sees it, from the
  content hash the engine core wrote into its ``extra_args`` at admission
  (see :mod:`vllm_negablate.engine_hooks`). It keeps that slot for its whole
  life, across chunked prefill, decode and preemption.
* A request whose set is not resident (it was removed before the request was
  scheduled) is computed with the poison slot: NaN log-probabilities and an
  error in the log, never a silently unablated answer.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vllm_negablate.neuron_set import ModelFingerprint, NeuronSet, NeuronSetError, is_no_ablation
from vllm_negablate.ops import SignAblatedActivation, ablate_dense_, ablate_sparse_
from vllm_negablate.settings import get_settings
from vllm_negablate.sharding import ShardSpec
from vllm_negablate.step_plan import StepPlan
from vllm_negablate.tables import NO_ABLATION_SLOT, AblationTables

logger = logging.getLogger("vllm_negablate")

# extra_args keys (SamplingParams.extra_args, filled by the OpenAI server from vllm_xargs)
NEURON_SET_KEY = "neuron_set"
NEURON_SET_HASH_KEY = "neuron_set_hash"
#: The first prompt position whose log-probability a request wants (int >= 1): the
#: worker skips the LM head for the rows before (``vllm_adapter._batched_prompt_logprobs``)
#: and answers them NaN. Internal: set by the server's ``/v1/negablate/loglikelihood``
#: route, refused by the middleware when a client sends it.
PROMPT_LOGPROBS_FROM_KEY = "negablate_prompt_logprobs_from"


_LAYER_MLP = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp$")
_ACT_ATTRS = ("act_fn", "act", "activation_fn")
_DENSE_IN_PROJ = ("dense_h_to_4h", "c_fc", "fc1", "fc_in", "up_proj", "w1")


class SlotsExhausted(NeuronSetError):
    """Every worker slot holds a named set or a running request's pinned content.

    Its class name travels in the RPC error text; the server reacts to it
    (``server.registry``) instead of reporting an invalid set.
    """


class UnsupportedModelError(RuntimeError):
    """The model has no MLP activation the plugin knows how to wrap."""


@dataclass
class WrappedLayer:
    layer: int
    module_name: str
    gated: bool
    local_width: int
    activation: str


def _local_width(mlp: nn.Module, gated: bool) -> int | None:
    """Per-rank MLP width read from the input projection vLLM built."""
    if gated:
        proj = getattr(mlp, "gate_up_proj", None)
        size = getattr(proj, "output_size_per_partition", None)
        return None if size is None else size // 2
    for attr in _DENSE_IN_PROJ:
        proj = getattr(mlp, attr, None)
        size = getattr(proj, "output_size_per_partition", None)
        if size is not None:
            return int(size)
        if isinstance(proj, nn.Linear):
            return proj.out_features
    return None


def _is_gated(act: nn.Module) -> bool:
    # vLLM's fused gated activations are all "<Act>AndMul" (SiluAndMul, GeluAndMul, ...)
    return type(act).__name__.endswith("AndMul")


def wrap_activations(model: nn.Module) -> list[WrappedLayer]:
    """Replace each decoder layer's MLP activation with a :class:`SignAblatedActivation`.

    The activation's input holds the MLP pre-activation (``blocks.{l}.mlp.hook_pre``),
    which is what the wrapper clamps.

    Idempotent: already-wrapped layers are reported, not wrapped twice.
    """
    wrapped: list[WrappedLayer] = []
    for name, mlp in model.named_modules():
        match = _LAYER_MLP.search(name)
        if not match:
            continue
        layer = int(match.group(1))
        for attr in _ACT_ATTRS:
            act = getattr(mlp, attr, None)
            if isinstance(act, nn.Module):
                break
        else:
            continue
        if isinstance(act, SignAblatedActivation):
            inner, gated = act.inner, act.gated
        else:
            inner, gated = act, _is_gated(act)
        width = _local_width(mlp, gated)
        if width is None:
            raise UnsupportedModelError(
                f"{name}: cannot tell the MLP width (no gate_up_proj / dense input projection)"
            )
        if not isinstance(act, SignAblatedActivation):
            setattr(mlp, attr, SignAblatedActivation(inner, layer, gated))
        wrapped.append(
            WrappedLayer(layer, f"{name}.{attr}", gated, width, type(inner).__name__)
        )
    return wrapped


@dataclass
class ResidentSet:
    neuron_set: NeuronSet
    content_hash: str
    slot: int


@dataclass
class WorkerRuntime:
    """Ablation state of one worker (one TP/PP rank).

    Bound to the process with :func:`vllm_negablate.context.set_runtime`, where
    the op (:mod:`vllm_negablate.ops`) finds it on every call.
    """

    fingerprint: ModelFingerprint
    layers: list[WrappedLayer]
    tables: AblationTables
    tp_rank: int = 0
    tp_size: int = 1
    kernel: str = "sparse"
    max_num_tokens: int = 8192
    names: dict[str, str] = field(default_factory=dict)  # name -> content hash
    slots: dict[str, ResidentSet] = field(default_factory=dict)  # content hash -> slot
    default_name: str | None = None
    request_slots: dict[str, int] = field(default_factory=dict)
    plan: StepPlan | None = None
    observer: Any = None  # discovery hook (MLP pre-activation statistics), None when off

    def __post_init__(self) -> None:
        device = next(iter(self.tables.layers.values())).lo.device if self.tables.layers else "cpu"
        self.slot_ids = torch.zeros(self.max_num_tokens, dtype=torch.long, device=device)

    # ------------------------------------------------------------ construction
    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        fingerprint: ModelFingerprint,
        *,
        tp_rank: int = 0,
        tp_size: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        max_sets: int | None = None,
        kernel: str | None = None,
        max_num_tokens: int = 8192,
    ) -> WorkerRuntime:
        layers = wrap_activations(model)
        if not layers:
            raise UnsupportedModelError(
                f"no '<...>.layers.N.mlp.<act_fn|act>' modules found in {type(model).__name__}"
            )
        if dtype is None or device is None:
            param = next(model.parameters())
            dtype = dtype or param.dtype
            device = device or param.device
        shards = {
            w.layer: ShardSpec(tp_rank, tp_size, w.local_width * tp_size) for w in layers
        }
        for w in layers:
            if w.local_width * tp_size != fingerprint.intermediate_size:
                raise UnsupportedModelError(
                    f"layer {w.layer}: MLP width {w.local_width} x tp {tp_size} does not match "
                    f"intermediate_size {fingerprint.intermediate_size}"
                )
        settings = get_settings()
        kernel = kernel or settings.kernel or "sparse"
        tables = AblationTables(shards, max_sets or settings.worker_slots, dtype, device)
        if kernel not in ("sparse", "dense"):
            raise ValueError(f"NEGABLATE_KERNEL must be 'sparse' or 'dense', got {kernel!r}")
        return cls(
            fingerprint=fingerprint,
            layers=layers,
            tables=tables,
            tp_rank=tp_rank,
            tp_size=tp_size,
            kernel=kernel,
            max_num_tokens=max_num_tokens,
        )

    # ------------------------------------------------------------- the op body
    def apply(self, h: torch.Tensor, layer: int) -> None:
        """Clamp ``h`` in place for the current step.

        ``h`` is this rank's shard of the MLP pre-activation
        (``blocks.{layer}.mlp.hook_pre``), ``[tokens, local_width]``; either
        kernel computes :func:`~vllm_negablate.ops.clamp_pre_activation_native`
        with each token's slot row.
        """
        if self.observer is not None:
            self.observer.observe(layer, h, self.plan)
        plan = self.plan
        table = self.tables.layers.get(layer)
        if table is None:
            return
        if self.kernel == "dense":
            ablate_dense_(h, table, self.slot_ids)
            return
        if plan is None or plan.is_noop:
            return
        ablate_sparse_(h, table, plan.runs)

    # -------------------------------------------------------------- scheduling
    def begin_step(
        self,
        req_ids: Sequence[str],
        num_scheduled_tokens: Mapping[str, int],
        extra_args_of: Mapping[str, Mapping[str, Any] | None],
        finished_req_ids: Sequence[str] = (),
    ) -> StepPlan:
        """Pin new requests, drop finished ones, and build this step's plan."""
        for req_id in finished_req_ids:
            self.request_slots.pop(req_id, None)
        for req_id in req_ids:
            if req_id not in self.request_slots:
                self.request_slots[req_id] = self._slot_for_new_request(
                    req_id, extra_args_of.get(req_id)
                )
        plan = StepPlan.build(req_ids, num_scheduled_tokens, self.request_slots)
        if plan.num_tokens > self.slot_ids.numel():
            self.slot_ids = torch.zeros(plan.num_tokens, dtype=torch.long, device=self.slot_ids.device)
        if self.kernel == "dense":
            plan.fill_slot_buffer(self.slot_ids)
        self.plan = plan
        return plan

    def end_step(self) -> None:
        self.plan = None
        if self.kernel == "dense":
            self.slot_ids.zero_()

    def _slot_for_new_request(self, req_id: str, extra_args: Mapping[str, Any] | None) -> int:
        args = extra_args or {}
        wanted_hash = args.get(NEURON_SET_HASH_KEY)
        name = args.get(NEURON_SET_KEY)
        if is_no_ablation(name):
            return NO_ABLATION_SLOT
        if wanted_hash is None and name is None:
            name = self.default_name
        if wanted_hash is None and name is not None:
            wanted_hash = self.names.get(name)
            if wanted_hash is None:
                logger.error(
                    "request %s asks for neuron set %r, which is not loaded: computing it "
                    "with NaN (poison) bounds so the error is visible", req_id, name,
                )
                return self.tables.poison_slot
        if wanted_hash is None:
            return NO_ABLATION_SLOT
        resident = self.slots.get(wanted_hash)
        if resident is None:
            logger.error(
                "request %s was admitted with neuron set %r (hash %s), which is no longer "
                "resident: computing it with NaN (poison) bounds", req_id, name, wanted_hash,
            )
            return self.tables.poison_slot
        return resident.slot

    # ------------------------------------------------------------- set control
    def load_set(self, neuron_set: NeuronSet) -> dict[str, Any]:
        """Make ``neuron_set`` resident under its name; raises and changes nothing on error."""
        neuron_set.check_compatible(self.fingerprint)
        content_hash = neuron_set.content_hash()
        if content_hash not in self.slots:
            slot = self._free_slot()
            self.tables.write_set(slot, neuron_set)
            self.slots[content_hash] = ResidentSet(neuron_set, content_hash, slot)
        self.names[neuron_set.name] = content_hash
        self._collect_garbage()
        return self.state()

    def unload_set(self, name: str) -> dict[str, Any]:
        if name not in self.names:
            raise NeuronSetError(f"unknown neuron set {name!r}; loaded: {sorted(self.names)}")
        del self.names[name]
        if self.default_name == name:
            self.default_name = None
        self._collect_garbage()
        return self.state()

    def set_default(self, name: str | None) -> dict[str, Any]:
        if name is not None and name not in self.names:
            raise NeuronSetError(f"unknown neuron set {name!r}; loaded: {sorted(self.names)}")
        self.default_name = name
        return self.state()

    def _pinned_slots(self) -> set[int]:
        return set(self.request_slots.values())

    def _free_slot(self) -> int:
        self._collect_garbage()
        used = {r.slot for r in self.slots.values()} | self._pinned_slots()
        for slot in self.tables.user_slots:
            if slot not in used:
                return slot
        raise SlotsExhausted(
            f"all {self.tables.num_user_slots} neuron-set slots are in use "
            f"(loaded: {sorted(self.names)}); remove a set first or raise NEGABLATE_WORKER_SLOTS"
        )

    def _collect_garbage(self) -> None:
        """Free slots whose content no name points to and no request is pinned to."""
        live_hashes = set(self.names.values())
        pinned = self._pinned_slots()
        for content_hash in list(self.slots):
            resident = self.slots[content_hash]
            if content_hash not in live_hashes and resident.slot not in pinned:
                self.tables.clear_slot(resident.slot)
                del self.slots[content_hash]

    def state(self) -> dict[str, Any]:
        """A JSON-able report; identical on every rank except the shard fields."""
        return {
            "fingerprint": self.fingerprint.model_dump(),
            "tp_rank": self.tp_rank,
            "tp_size": self.tp_size,
            "kernel": self.kernel,
            "default": self.default_name,
            "max_sets": self.tables.num_user_slots,
            "sets": {
                name: {
                    "content_hash": h,
                    "slot": self.slots[h].slot,
                    "num_neurons": self.slots[h].neuron_set.num_neurons(),
                    "local_neurons": sum(self.tables.active_columns(self.slots[h].slot).values()),
                }
                for name, h in sorted(self.names.items())
            },
            "layers": [w.layer for w in self.layers],
            "in_flight": len(self.request_slots),
        }
