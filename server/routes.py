"""The control API: neuron sets uploaded, listed, activated and removed at runtime.

Added to vLLM's own FastAPI app, so the routes share its port, its error
format and its OpenAPI page (/docs). Authentication happens in
:mod:`server.middleware` (it must run before vLLM's ``--api-key`` check); the
dependency below refuses any request the middleware did not clear.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.registry import SetInUse, SetNotFound, SetRegistry, WorkerError
from server.residency import NoEvictableSlot, SetGone, SlotWaitTimeout
from server.schemas import (
    AblationState,
    DeletedResponse,
    ErrorResponse,
    NeuronSetList,
    NeuronSetSummary,
    SetDefaultRequest,
    SlotWaits,
    WorkerState,
)
from vllm_negablate.neuron_set import NeuronSet, NeuronSetError

AUTH_SCOPE_KEY = "negablate_authorized"


def require_admin(request: Request) -> None:
    if request.scope.get(AUTH_SCOPE_KEY) is not True:
        raise HTTPException(HTTPStatus.UNAUTHORIZED, "admin key required (Authorization: Bearer <admin key>)")


def get_registry(request: Request) -> SetRegistry:
    return request.app.state.negablate


ERRORS = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key."},
    403: {"model": ErrorResponse, "description": "No admin key configured: read-only."},
    404: {"model": ErrorResponse, "description": "Unknown neuron set."},
    409: {"model": ErrorResponse, "description": "Set still in use after the wait limit (delete), "
                                                "or being deleted (upload)."},
    422: {"model": ErrorResponse, "description": "Invalid set (schema, range, model shape, reserved name)."},
    503: {"model": ErrorResponse, "description": "No slot for the set within the wait limit (Retry-After)."},
}

def _format_validation(errors) -> tuple[int, str]:
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "malformed JSON body: " + "; ".join(str(e.get("msg")) for e in errors)
    parts = []
    for e in errors:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return 422, "invalid request: " + "; ".join(parts)


class OpenAIErrorRoute(APIRoute):
    """Every error of these routes in OpenAI's shape, whatever raised it.

    vLLM's handlers cover FastAPI's ``HTTPException`` but not body-parsing or
    Starlette errors; the control API answers ``{"error": {...}}`` for all.
    """

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def wrapped(request: Request):
            headers = None
            try:
                return await handler(request)
            except RequestValidationError as exc:
                status, message = _format_validation(exc.errors())
            except StarletteHTTPException as exc:
                status, message = exc.status_code, str(exc.detail)
                headers = getattr(exc, "headers", None)
            type_ = HTTPStatus(status).phrase.title().replace(" ", "") + "Error"
            return JSONResponse(ErrorResponse.make(status, message, type_).model_dump(),
                                status_code=status, headers=headers)

        return wrapped


router = APIRouter(
    tags=["neuron sets"], dependencies=[Depends(require_admin)], responses=ERRORS,
    route_class=OpenAIErrorRoute,
)


def _summary(reg: SetRegistry, ns: NeuronSet) -> NeuronSetSummary:
    return NeuronSetSummary(
        name=ns.name,
        content_hash=reg.hash_of(ns),
        num_neurons=ns.num_neurons(),
        layers=ns.counts_per_layer(),
        modes=sorted({e.mode.value for e in ns.entries}),
        provenance=ns.provenance,
        resident=ns.name in reg.slots.last_used,
        in_flight=reg.in_flight[ns.name],
        waiting=reg.slots.waiting()[ns.name],
        is_default=reg.default == ns.name,
    )


def _http_error(exc: Exception) -> HTTPException:
    if isinstance(exc, (SetNotFound, SetGone)):
        return HTTPException(HTTPStatus.NOT_FOUND, str(exc))
    if isinstance(exc, SetInUse):
        return HTTPException(HTTPStatus.CONFLICT, str(exc))
    if isinstance(exc, SlotWaitTimeout):
        return HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, str(exc),
                             headers={"Retry-After": str(max(1, round(exc.retry_after)))})
    if isinstance(exc, NoEvictableSlot):
        return HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, str(exc))
    if isinstance(exc, (WorkerError, NeuronSetError)):
        return HTTPException(HTTPStatus.UNPROCESSABLE_ENTITY, str(exc))
    return HTTPException(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(exc).__name__}: {exc}")


@router.get("/v1/neuron-sets", response_model=NeuronSetList, summary="List neuron sets")
async def list_sets(reg: SetRegistry = Depends(get_registry)) -> NeuronSetList:
    return NeuronSetList(
        default=reg.default,
        max_resident=reg.max_resident,
        wait_timeout_s=reg.wait_timeout,
        slot_waits=SlotWaits(**reg.slots.wait_stats()),
        data=[_summary(reg, ns) for _, ns in sorted(reg.sets.items())],
    )


@router.put("/v1/neuron-sets/{name}", response_model=NeuronSetSummary, summary="Upload or replace a set")
async def put_set(name: str, neuron_set: NeuronSet, reg: SetRegistry = Depends(get_registry)) -> NeuronSetSummary:
    """Validate the set against the served model and persist it; no free slot needed.

    The set becomes resident on first use. Replacing a set that running requests use
    waits for them (new requests for it wait behind the upload and get the new content;
    409 if they run past the wait limit, nothing replaced): a set's content never changes
    under a request. The name `none` is reserved (it selects no ablation): 422.
    """
    if neuron_set.name != name:
        raise HTTPException(
            HTTPStatus.UNPROCESSABLE_ENTITY,
            f"the set's name {neuron_set.name!r} differs from the URL's {name!r}",
        )
    try:
        await reg.put(neuron_set)
    except Exception as exc:
        raise _http_error(exc) from exc
    return _summary(reg, neuron_set)


@router.get("/v1/neuron-sets/{name}", response_model=NeuronSet, summary="Get a set")
async def get_set(name: str, reg: SetRegistry = Depends(get_registry)) -> NeuronSet:
    try:
        return reg.get(name)
    except SetNotFound as exc:
        raise _http_error(exc) from exc


@router.delete("/v1/neuron-sets/{name}", response_model=DeletedResponse, summary="Remove a set")
async def delete_set(name: str, reg: SetRegistry = Depends(get_registry)) -> DeletedResponse:
    """Remove a set once the requests running with it have finished.

    From the call on, new requests naming the set get 404. If the running ones do
    not finish within the server's wait limit (`--set-wait-timeout`), nothing is
    deleted and the answer is 409 with their count.
    """
    try:
        await reg.delete(name)
    except Exception as exc:
        raise _http_error(exc) from exc
    return DeletedResponse(deleted=name)


async def _state(reg: SetRegistry) -> AblationState:
    try:
        states = await reg.worker_states()
    except WorkerError as exc:
        raise HTTPException(HTTPStatus.SERVICE_UNAVAILABLE, f"workers did not report: {exc}") from exc
    workers = [WorkerState(**{k: s[k] for k in WorkerState.model_fields}) for s in states]
    views = [{n: i["content_hash"] for n, i in w.sets.items()} for w in workers]
    return AblationState(
        model=reg.fingerprint,
        default=reg.default,
        resident=reg.resident,
        workers=workers,
        consistent=all(v == views[0] for v in views) and all(w.default == reg.default for w in workers),
    )


@router.put("/v1/ablation/default", response_model=AblationState, summary="Set the default set")
async def set_default(body: SetDefaultRequest, reg: SetRegistry = Depends(get_registry)) -> AblationState:
    """Requests that name no set use the default *as it was when they were admitted*."""
    try:
        await reg.set_default(body.name)
    except Exception as exc:
        raise _http_error(exc) from exc
    return await _state(reg)


@router.get("/v1/ablation", response_model=AblationState, summary="Ablation state of every worker")
async def get_state(reg: SetRegistry = Depends(get_registry)) -> AblationState:
    return await _state(reg)
