"""``POST /v1/negablate/loglikelihood``: lm_eval's ``loglikelihood`` contract, computed lean.

lm_eval scores a multiple-choice answer as the summed log-probability of the
continuation given the context, plus whether every continuation token was the
model's top choice (``is_greedy``). Through ``/v1/completions`` it asks for the
log-probability of *every* prompt position (``echo``) and keeps the
continuation's; the engine computes the LM head and a log-softmax over the whole
vocabulary at each context position for nothing. On Gemma 3 (262,144 tokens) the
LM head is about 62% of a token's FLOPs, and contexts are most of each prompt.

This route takes (context, continuation) token ids per item and asks the engine
for the continuation's rows only
(:func:`vllm_negablate.vllm_adapter.continuation_logprobs`); the numbers are the
same rows vLLM computes for ``/v1/completions`` (tested to float tolerance against
it and against the transformers oracle). The neuron set is chosen exactly as on
``/v1/completions``: ``"model": "BASE@SET"`` or ``vllm_xargs.neuron_set`` (and
``neuron_set_hash``), resolved and held for the whole request by
:mod:`server.middleware`; every item of a request is scored with the same set.
The lm_eval side is :mod:`eval.lm_eval_tasks.negablate_lm` (model ``negablate``).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from http import HTTPStatus

from fastapi import APIRouter, HTTPException, Request

from server.registry import SetNotFound
from server.routes import OpenAIErrorRoute
from server.schemas import (
    LOGLIKELIHOOD_PATH,
    ErrorResponse,
    LoglikelihoodRequest,
    LoglikelihoodResponse,
    LoglikelihoodResult,
)
from vllm_negablate import vllm_adapter
from vllm_negablate.neuron_set import NO_ABLATION, is_no_ablation
from vllm_negablate.runtime import NEURON_SET_HASH_KEY, NEURON_SET_KEY

XARGS_KEYS = frozenset({NEURON_SET_KEY, NEURON_SET_HASH_KEY})


router = APIRouter(tags=["scoring"], route_class=OpenAIErrorRoute, responses={
    400: {"model": ErrorResponse, "description": "Bad item (too long, unknown token id) or vllm_xargs key."},
    404: {"model": ErrorResponse, "description": "Unknown model or neuron set."},
    409: {"model": ErrorResponse, "description": "neuron_set_hash names other content than the set holds, "
                                                "or the set changed while the items were admitted (retry)."},
})


def _check(body: LoglikelihoodRequest, request: Request) -> None:
    """Refuse the whole request before any item reaches the engine."""
    state = request.app.state
    if not vllm_adapter.serves_model(state, body.model):
        raise HTTPException(HTTPStatus.NOT_FOUND, f"The model `{body.model}` does not exist.")
    unknown = sorted(set(body.vllm_xargs or {}) - XARGS_KEYS)
    if unknown:
        raise HTTPException(HTTPStatus.BAD_REQUEST,
                            f"vllm_xargs may only hold {sorted(XARGS_KEYS)} on this route; got {unknown}")
    max_len, vocab = vllm_adapter.served_limits(state)
    for i, item in enumerate(body.items):
        n = len(item.context) + len(item.continuation)
        if n > max_len:
            raise HTTPException(HTTPStatus.BAD_REQUEST, f"items[{i}]: {n} tokens, more than the "
                                f"model's context of {max_len}: truncate the context first")
        bad = [t for t in (*item.context, *item.continuation) if not 0 <= t < vocab]
        if bad:
            raise HTTPException(HTTPStatus.BAD_REQUEST,
                                f"items[{i}]: token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}")


def _pinned_selection(xargs: dict[str, str], request: Request) -> dict[str, str]:
    """The neuron set every item is scored with, named with its content hash.

    The engine pins each of its requests to a set at admission, and a request's items are
    admitted one by one: a set replaced under its name (or a new default) in between would
    score the later items with other content. The middleware already resolves the default
    and holds the set (a replacing upload waits for the request) and sends the held hash;
    this pins again (the set named, else the server's default now, else ``none``) so the
    route is exact on its own: content changed under it anyway makes the later items fail
    the engine's hash check, and the route answers 409 rather than a mix.
    """
    registry = request.app.state.negablate
    name = xargs.get(NEURON_SET_KEY, registry.default)
    if name is None or is_no_ablation(name):
        return {NEURON_SET_KEY: NO_ABLATION}
    return {NEURON_SET_KEY: name, NEURON_SET_HASH_KEY: xargs.get(NEURON_SET_HASH_KEY) or registry.content_hash(name)}


@router.post(LOGLIKELIHOOD_PATH, response_model=LoglikelihoodResponse, summary="Log-likelihood of continuations")
async def loglikelihood(body: LoglikelihoodRequest, request: Request) -> LoglikelihoodResponse:
    """lm_eval's ``loglikelihood``: per item, the continuation's summed log-probability
    given the context and whether it is the greedy continuation."""
    _check(body, request)
    try:
        xargs = _pinned_selection(dict(body.vllm_xargs or {}), request)
    except SetNotFound as exc:  # deleted since the middleware resolved it
        raise HTTPException(HTTPStatus.NOT_FOUND, str(exc)) from None
    base_id = f"negll-{uuid.uuid4().hex}"
    try:
        async with asyncio.TaskGroup() as group:  # one failure cancels the rest
            tasks = [group.create_task(vllm_adapter.continuation_logprobs(
                request.app.state, [*item.context, *item.continuation], len(item.context), xargs,
                f"{base_id}-{i}")) for i, item in enumerate(body.items)]
    except* ValueError as errors:
        raise HTTPException(HTTPStatus.BAD_REQUEST, "; ".join(str(e) for e in errors.exceptions)) from None
    data = []
    for i, task in enumerate(tasks):
        scored = task.result()
        logprobs = [lp for lp, _ in scored]
        if any(math.isnan(lp) for lp in logprobs):  # the engine could not pin the set: never a number
            _raise_unpinned(xargs, request, i)
        data.append(LoglikelihoodResult(index=i, logprob=math.fsum(logprobs),
                                        is_greedy=all(rank == 1 for _, rank in scored),
                                        token_logprobs=logprobs))
    return LoglikelihoodResponse(model=body.model, neuron_set=xargs[NEURON_SET_KEY],
                                 content_hash=xargs.get(NEURON_SET_HASH_KEY), data=data)


def _raise_unpinned(xargs: dict[str, str], request: Request, index: int) -> None:
    """409 when the pinned set was replaced or removed while the items were admitted
    (retrying scores the new content throughout), else 500."""
    registry = request.app.state.negablate
    name, pinned = xargs.get(NEURON_SET_KEY), xargs.get(NEURON_SET_HASH_KEY)
    current = registry.content_hash(name) if pinned and name in registry.sets else None  # None: deleted
    if pinned and current != pinned:
        raise HTTPException(HTTPStatus.CONFLICT, f"neuron set `{name}` changed while this request's items "
                            f"were admitted (content {pinned} -> {current}); nothing was scored with a mix: "
                            "send the request again")
    raise HTTPException(HTTPStatus.INTERNAL_SERVER_ERROR,
                        f"items[{index}]: the engine answered NaN (see the server log)")
