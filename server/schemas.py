"""Pydantic models of the control API and of ``/v1/negablate/loglikelihood`` (they appear
in vLLM's OpenAPI at /docs). Light imports only: the typed client reads them too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from vllm_negablate.neuron_set import NO_ABLATION, ModelFingerprint, Provenance


class NeuronSetSummary(BaseModel):
    name: str
    content_hash: str
    num_neurons: int
    layers: dict[int, int] = Field(description="Ablated neurons per layer.")
    modes: list[str]
    provenance: Provenance
    resident: bool = Field(description="Loaded on the workers now (else reloaded on first use).")
    in_flight: int = Field(description="Requests using this set right now.")
    waiting: int = Field(0, description="Requests queued for a resident slot for this set.")
    is_default: bool


class SlotWaits(BaseModel):
    count: int = 0
    p50_s: float = 0.0
    p99_s: float = 0.0
    max_s: float = 0.0


class NeuronSetList(BaseModel):
    object: str = "list"
    default: str | None
    max_resident: int
    no_ablation: str = Field(NO_ABLATION, description="The reserved selector for no ablation (BASE@none).")
    wait_timeout_s: float = Field(0.0, description="How long a request waits for a resident slot.")
    slot_waits: SlotWaits = Field(default_factory=lambda: SlotWaits(),
                                  description="Queueing of recent requests whose set was not resident.")
    data: list[NeuronSetSummary]


class SetDefaultRequest(BaseModel):
    name: str | None = Field(
        description="Neuron set for requests that name none; null (or \"none\"): no ablation.")


class WorkerState(BaseModel):
    tp_rank: int
    tp_size: int
    kernel: str
    default: str | None
    sets: dict[str, dict[str, Any]]
    layers: list[int]
    in_flight: int


class AblationState(BaseModel):
    model: ModelFingerprint
    default: str | None
    resident: list[str]
    workers: list[WorkerState] = Field(description="What each TP/PP rank reports (content hashes).")
    consistent: bool = Field(description="All workers report the same sets and hashes.")


class DeletedResponse(BaseModel):
    deleted: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    """OpenAI-style error body, the same shape vLLM returns."""

    error: ErrorInfo

    @classmethod
    def make(cls, code: int, message: str, type_: str, param: str | None = None) -> ErrorResponse:
        return cls(error=ErrorInfo(message=message, type=type_, param=param, code=code))


# ------------------------------------------------ /v1/negablate/loglikelihood
LOGLIKELIHOOD_PATH = "/v1/negablate/loglikelihood"
#: Items one request may carry: a bound on the work a single call can queue and on
#: its answer (lm_eval sends ``batch_size`` items, 16 by default here).
MAX_ITEMS = 1024


class LoglikelihoodItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context: list[int] = Field(min_length=1, description="Token ids before the continuation "
                               "(with the start token if the model wants one): not scored.")
    continuation: list[int] = Field(min_length=1, description="Token ids whose log-probabilities are summed.")


class LoglikelihoodRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The served model, or BASE@SET / BASE@none to choose the neuron set.")
    items: list[LoglikelihoodItem] = Field(min_length=1, max_length=MAX_ITEMS)
    vllm_xargs: dict[str, str] | None = Field(
        None, description="neuron_set and neuron_set_hash, as on /v1/completions (nothing else).")


class LoglikelihoodResult(BaseModel):
    index: int
    logprob: float = Field(description="Sum of the continuation tokens' log-probabilities.")
    is_greedy: bool = Field(description="Every continuation token ranked first (ties count).")
    token_logprobs: list[float] = Field(description="Each continuation token's log-probability.")


class LoglikelihoodResponse(BaseModel):
    object: Literal["negablate.loglikelihood"] = "negablate.loglikelihood"
    model: str
    neuron_set: str = Field(description="The set every item was scored with: the one named, else the "
                            "server's default at the time, else `none` (no ablation).")
    content_hash: str | None = Field(None, description="That set's content hash (None for `none`).")
    data: list[LoglikelihoodResult]
