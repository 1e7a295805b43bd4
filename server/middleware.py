"""ASGI middleware: admin auth for the control API, and neuron-set selection per request.

vLLM adds it through its own ``--middleware`` option (``build_app`` must see it
before the middleware stack is built), so it is the outermost layer and runs
before vLLM's ``--api-key`` check. It does three things:

* Control routes (``/v1/neuron-sets``, ``/v1/ablation``): check
  ``Authorization: Bearer <admin key>``; without it answer 401 (403 for
  writes when no admin key is configured) and stop. When cleared, the
  request is marked authorized and, if vLLM has API keys, its header is
  swapped for one so vLLM's own check passes: the admin key is the credential
  for control calls, the API key for completions.
* ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/negablate/loglikelihood``
  (:mod:`server.loglikelihood`): ``"model": "BASE@SET"``
  becomes ``"model": "BASE"`` plus ``vllm_xargs.neuron_set = SET``;
  ``vllm_xargs.neuron_set`` given directly is checked the same way. An unknown
  set is an OpenAI-style 404 before anything reaches the engine. ``BASE@none``
  (or ``neuron_set: "none"``) is the reserved "no ablation" selector: it goes
  to the engine as ``neuron_set: "none"``, which wins over the default set.
  A request naming no set gets the server's default, resolved once on arrival.
  A named (or default) set is held for the request (made resident first if it
  was not, waiting in line for a slot: 503 with ``Retry-After`` only after the
  wait limit) until the last byte of the response, streamed or not, is sent, and
  its content hash goes to the engine with it (``neuron_set_hash``): vLLM admits
  the prompts of one request one at a time, and each is checked against the
  content held (a replacing upload waits for the request: :mod:`server.registry`).
  ``vllm_xargs`` keys internal to the server
  (:data:`~vllm_negablate.runtime.PROMPT_LOGPROBS_FROM_KEY`) are refused (400).
* Everything else passes through untouched.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from server.registry import SetNotFound
from server.residency import SetGone, SlotWaitTimeout
from server.routes import AUTH_SCOPE_KEY
from server.schemas import LOGLIKELIHOOD_PATH, ErrorResponse
from vllm_negablate import vllm_adapter
from vllm_negablate.neuron_set import NO_ABLATION, NeuronSetError, is_no_ablation
from vllm_negablate.runtime import NEURON_SET_HASH_KEY, NEURON_SET_KEY, PROMPT_LOGPROBS_FROM_KEY

CONTROL_PREFIXES = ("/v1/neuron-sets", "/v1/ablation")
SCORING_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", LOGLIKELIHOOD_PATH})
SET_KEY = NEURON_SET_KEY
#: extra_args keys only the server itself may set: a client sending one is refused.
INTERNAL_KEYS = frozenset({PROMPT_LOGPROBS_FROM_KEY})


async def _send_json(send, status: int, body: dict[str, Any],
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    payload = json.dumps(body).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()), *(headers or [])],
    })
    await send({"type": "http.response.body", "body": payload})


def _error(status: int, message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    return ErrorResponse.make(status, message, type_, param).model_dump()


def _bearer(scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            text = value.decode("latin-1")
            return text[7:] if text[:7].lower() == "bearer " else ""
    return ""


def _replace_header(scope, name: bytes, value: bytes | None) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k != name]
    if value is not None:
        headers.append((name, value))
    return {**scope, "headers": headers}


class NegablateMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        if path.startswith(CONTROL_PREFIXES):
            return await self._control(scope, receive, send)
        if scope["method"] == "POST" and path in SCORING_PATHS:
            return await self._scoring(scope, receive, send)
        return await self.app(scope, receive, send)

    # ----------------------------------------------------------- control API
    async def _control(self, scope, receive, send) -> None:
        state = scope["app"].state
        admin_key: str | None = getattr(state, "negablate_admin_key", None)
        given = _bearer(scope)
        if admin_key:
            if not hmac.compare_digest(given.encode(), admin_key.encode()):
                return await _send_json(send, 401, _error(
                    401, "invalid or missing admin key: send 'Authorization: Bearer <admin key>'",
                    "AuthenticationError"))
        elif scope["method"] not in ("GET", "HEAD"):
            return await _send_json(send, 403, _error(
                403, "the control API is read-only because no admin key is configured: start "
                "`negablate serve` with --admin-key KEY (or set NEGABLATE_ADMIN_KEY)",
                "PermissionDeniedError"))
        scope = {**scope, AUTH_SCOPE_KEY: True}
        api_keys = getattr(state, "negablate_api_keys", None)
        if api_keys:  # let vLLM's own --api-key check pass: the admin key was the credential
            scope = _replace_header(scope, b"authorization", f"Bearer {api_keys[0]}".encode())
        return await self.app(scope, receive, send)

    # ------------------------------------------------------------ completions
    async def _scoring(self, scope, receive, send) -> None:
        state = scope["app"].state
        registry = getattr(state, "negablate", None)
        api_keys = getattr(state, "negablate_api_keys", None)
        if registry is None or (api_keys and _bearer(scope) not in api_keys):
            return await self.app(scope, receive, send)  # vLLM answers (401, or no plugin)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        original = data
        name, data, from_default = self._select(data, state)
        if isinstance(name, dict):  # an error body
            return await _send_json(send, name["error"]["code"], name)
        if name is not None:
            try:
                await registry.acquire(name)
            except (SetNotFound, SetGone) as exc:
                if not from_default:
                    return await _send_json(send, 404, _error(404, str(exc), "NotFoundError", "model"))
                # the default went away meanwhile (deleted): what a request naming no set gets now
                name, data = None, _with_xargs(data, {SET_KEY: NO_ABLATION})
            except SlotWaitTimeout as exc:
                return await _send_json(
                    send, 503, _error(503, str(exc), "ServiceUnavailableError", "model"),
                    headers=[(b"retry-after", str(max(1, round(exc.retry_after))).encode())])
            except NeuronSetError as exc:  # no evictable slot, or the workers refused the set
                return await _send_json(send, 503, _error(503, str(exc), "ServiceUnavailableError",
                                                          "model"))
        if name is not None:
            conflict = _content_conflict(registry, name, data)
            if conflict is not None:
                registry.release(name)
                return await _send_json(send, 409, conflict)
            # Every prompt of the request expects the content held now: the engine admits
            # them one at a time and checks each against this hash (a client's own hash
            # was just checked to be this one).
            if NEURON_SET_HASH_KEY not in data["vllm_xargs"]:
                data = _with_xargs(data, {NEURON_SET_HASH_KEY: registry.content_hash(name)})
        if data is not original:
            body = json.dumps(data).encode()
            scope = _replace_header(scope, b"content-length", str(len(body)).encode())
        replayed = False
        held = name is not None

        def release() -> None:
            nonlocal held
            if held:
                held = False
                registry.release(name)

        async def replay():
            nonlocal replayed
            if replayed:  # vLLM keeps listening for http.disconnect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_releasing(message):
            # Free the set *before* the last byte goes out: a client that reads the
            # answer and then deletes or replaces the set never finds it still in use.
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()
            await send(message)

        try:
            await self.app(scope, replay, send_releasing if held else send)
        finally:
            release()

    @staticmethod
    def _select(data: Any, state) -> tuple[Any, Any, bool]:
        """(set name or None or an error dict, rewritten body, whether the name is the
        server's default, resolved here because the request named no set).

        The default is resolved when the request arrives, not per prompt at admission: a
        request with several prompts gets one set whatever the default becomes meanwhile.
        """
        if not isinstance(data, dict):
            return None, data, False  # vLLM reports the malformed body
        registry = state.negablate
        model = data.get("model")
        xargs = data.get("vllm_xargs")
        xargs = dict(xargs) if isinstance(xargs, dict) else None
        internal = sorted(INTERNAL_KEYS & set(xargs or {}))
        if internal:
            return _error(400, f"vllm_xargs {internal} is internal to the server (its rows before "
                          "that position would read NaN); ask /v1/negablate/loglikelihood for "
                          "continuation log-probabilities", "BadRequestError", "vllm_xargs"), data, False
        name = xargs.get(SET_KEY) if xargs else None
        if isinstance(model, str) and "@" in model:
            base, _, at_name = model.partition("@")
            if not vllm_adapter.serves_model(state, base):
                return None, data, False  # vLLM's own "model does not exist" 404
            if name is not None and name != at_name:
                return _error(400, f"model names set {at_name!r} but vllm_xargs.neuron_set is {name!r}",
                              "BadRequestError", "model"), data, False
            name = at_name
            data = {**data, "model": base}
        from_default = False
        if name is None:
            if registry.default is None:
                return None, data, False
            name, from_default = registry.default, True
        if is_no_ablation(name):  # the reserved selector: no ablation, whatever the default
            return None, _with_xargs(data, {SET_KEY: NO_ABLATION}), False
        if not isinstance(name, str) or name not in registry.sets:
            return _error(404, f"The neuron set `{name}` does not exist. Known sets: "
                          f"{sorted(registry.sets)} (`{NO_ABLATION}`: no ablation).",
                          "NotFoundError", "model"), data, False
        return name, _with_xargs(data, {SET_KEY: name}), from_default


def _with_xargs(data: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``data`` with ``extra`` merged into its ``vllm_xargs`` (a new dict)."""
    xargs = data.get("vllm_xargs")
    return {**data, "vllm_xargs": {**(xargs if isinstance(xargs, dict) else {}), **extra}}


def _content_conflict(registry, name: str, data: Any) -> dict | None:
    """The 409 body for a request that names the content it expects
    (``vllm_xargs.neuron_set_hash``) when ``name`` now holds other content; else None.

    Why: a client that scores a set over many requests (and caches the answers under
    the set's content hash) must never get some of them from a set replaced under the
    same name meanwhile. Checked while the request holds the set; the engine checks the
    hash again at admission.
    """
    xargs = data.get("vllm_xargs") if isinstance(data, dict) else None
    expected = xargs.get(NEURON_SET_HASH_KEY) if isinstance(xargs, dict) else None
    if expected is None:
        return None
    current = registry.content_hash(name)
    if expected == current:
        return None
    return _error(409, f"neuron set `{name}` now has content hash {current}, the request "
                  f"expected {expected}: the set was replaced under the same name since the "
                  "client read it; read its card again (GET /v1/models) to score the new content",
                  "ConflictError", "model")
