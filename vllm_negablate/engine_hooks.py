"""Engine-core side: pin each request's neuron set at admission, and salt its cache key.

The engine core's main loop handles ``add_request`` and ``collective_rpc``
calls one at a time, in arrival order. That makes it the one place where "the
default set as it was when the request was admitted" has a precise meaning,
and where the prefix-cache key can be made to depend on the set *before* the
scheduler looks for cached blocks.

:class:`EngineCoreMirror` keeps a copy of the worker state (names, content
hashes, default), refreshed from the return value of every ``negablate_*``
RPC. :func:`pin_set` then, for each new request:

1. resolves its set (``extra_args["neuron_set"]``, else the current default);
   ``"none"`` (:data:`~vllm_negablate.neuron_set.NO_ABLATION`) means no
   ablation whatever the default, and a request that resolves to no set is
   pinned as ``"none"`` so a default set later cannot reach it;
2. writes the set's content hash into ``extra_args["neuron_set_hash"]`` so the
   worker uses exactly that content, whatever happens to the name later;
3. sets ``cache_salt = "negablate:<hash>[:<user salt>]"``; the caller,
   :func:`vllm_negablate.vllm_adapter.pin_request`, then recomputes the
   request's block hashes, so KV blocks computed under one set are never
   reused for another (vLLM hashes ``cache_salt`` into the first block, and
   every later block hash chains on it).

Only the request's ``sampling_params`` and ``cache_salt`` are touched here:
they hold the documented request inputs of the same names (the user's
``SamplingParams``, whose ``extra_args`` is public, and the prompt's
``cache_salt``). The engine's ``Request`` internals (block hashes) belong to
:mod:`vllm_negablate.vllm_adapter`, the one module that uses private vLLM names.

Requests without a set (and no default) keep vLLM's own cache key and they share blocks with each other, as they should.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from vllm_negablate.neuron_set import NO_ABLATION, is_no_ablation
from vllm_negablate.runtime import NEURON_SET_HASH_KEY, NEURON_SET_KEY

logger = logging.getLogger("vllm_negablate")

SALT_PREFIX = "negablate:"


@dataclass
class EngineCoreMirror:
    names: dict[str, str] = field(default_factory=dict)  # name -> content hash
    default: str | None = None
    initialized: bool = False

    def update(self, state: dict[str, Any]) -> None:
        self.names = {name: info["content_hash"] for name, info in state.get("sets", {}).items()}
        self.default = state.get("default")
        self.initialized = True


def salt_for(content_hash: str, user_salt: str | None) -> str:
    salt = f"{SALT_PREFIX}{content_hash}"
    return f"{salt}:{user_salt}" if user_salt else salt


class UnknownNeuronSetError(ValueError):
    pass


def pin_set(request: Any, mirror: EngineCoreMirror) -> str | None:
    """Pin ``request`` to a set and salt its cache key; return the set name.

    ``request`` is a ``vllm.v1.request.Request``; only its ``sampling_params``
    and ``cache_salt`` are read and replaced. The block hashes are left to the
    caller (:func:`vllm_negablate.vllm_adapter.pin_request`). Raises
    :class:`UnknownNeuronSetError` if it names a set that is not loaded.
    """
    params = getattr(request, "sampling_params", None)
    if params is None:  # pooling requests: nothing to pin
        return None
    extra = dict(params.extra_args or {})
    name = extra.get(NEURON_SET_KEY, mirror.default)
    if name is None or name == "" or is_no_ablation(name):
        # Pin "no ablation" too: a default set after admission must not reach it.
        if extra.get(NEURON_SET_KEY) != NO_ABLATION:
            extra[NEURON_SET_KEY] = NO_ABLATION
            extra.pop(NEURON_SET_HASH_KEY, None)
            params = copy.copy(params)
            params.extra_args = extra
            request.sampling_params = params
        return None
    content_hash = mirror.names.get(name)
    if content_hash is None:
        raise UnknownNeuronSetError(
            f"neuron set {name!r} is not loaded (loaded: {sorted(mirror.names)})"
        )
    expected = extra.get(NEURON_SET_HASH_KEY)
    if expected is not None and expected != content_hash:
        raise UnknownNeuronSetError(
            f"neuron set {name!r} has content hash {content_hash}, the request expected {expected}"
        )
    extra[NEURON_SET_KEY] = name
    extra[NEURON_SET_HASH_KEY] = content_hash
    # Never mutate a SamplingParams another request may share (in-process engines).
    params = copy.copy(params)
    params.extra_args = extra
    request.sampling_params = params
    user_salt = request.cache_salt
    if user_salt and user_salt.startswith(SALT_PREFIX):
        user_salt = None  # already salted by a front end that knew the hash
    request.cache_salt = salt_for(content_hash, user_salt)
    return name
