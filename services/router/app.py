"""The OpenAI HTTP API of the router: a thin FastAPI adapter over CompletionCore.

    GET  /v1/models, /v1/models/{id}
    POST /v1/completions, /v1/chat/completions   (stream: Server-Sent Events ending in [DONE])
    GET  /health (liveness: 200 while the process serves), /ready (readiness: 503 until at least
         one prefill and one decode worker are routable), /metrics

Every error leaves as an OpenAI error object (errors.py decides the status); FastAPI's 422s are 400s.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from services.common.json_ids import read_id_array, reader_built
from services.router.auth import ApiKeyGate, install_api_keys
from services.router.completion import CompletionCore
from services.router.dispatch import Dispatcher
from services.router.errors import (
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    RouteNotFound,
    RouterError,
    error_body,
    from_validation_errors,
    internal_error_body,
)
from services.router.job import CompletionJob
from services.router.metrics import RouterMetrics
from services.router.openai_schema import ChatCompletionRequest, CompletionRequest, GenerationRequest
from services.router.page_hashes import RecentPrompts, use_recent
from services.router.prompts import chat_job, completion_job
from services.router.responses import ChatFormat, CompletionFormat, Envelope
from services.router.routing import IndexSource, RoutingPipeline
from services.router.secured_clients import SecuredWorkerClients
from services.router.settings import RouterSettings
from services.router.streaming import (
    CLIENT_CLOSED,
    ClientGone,
    RequestTrack,
    StreamSession,
    run_or_disconnect,
)
from services.router.tokenization import RouterTokenizer
from services.router.workers import WorkerPool

log = logging.getLogger("swaserve.router")
M = TypeVar("M", bound=GenerationRequest)


@dataclass(frozen=True)
class RouterState:
    settings: RouterSettings
    pool: WorkerPool
    tok: RouterTokenizer
    core: CompletionCore
    metrics: RouterMetrics
    started: int


def create_app(
    settings: RouterSettings,
    worker_pool: WorkerPool,
    *,
    index: IndexSource | None = None,
    l2_index: IndexSource | None = None,
    routing: RoutingPipeline | None = None,
    metrics: RouterMetrics | None = None,
    residency: Any = None,
    api_keys: ApiKeyGate | None = None,
) -> FastAPI:
    """`index`: the prefix index follower (None: load-only routing); `l2_index`: the follower of
    the workers' host tiers (tier "l2"); `routing` overrides the pipeline built from them;
    `residency`: records each decision as the worker's pending cache (services/router/residency.py);
    `api_keys`: API keys and rate limits on every path but /health, /ready, /metrics (auth.py)."""
    tok = RouterTokenizer(settings.model_dir)
    metrics = metrics or RouterMetrics()
    routing = routing or RoutingPipeline(settings.policy, index, l2_index=l2_index)
    metrics.use_buckets(settings.policy.buckets)
    metrics.watch(
        worker_pool, routing.index, routing.index_usable, lambda: routing.index_errors, residency=residency
    )
    clients = SecuredWorkerClients()  # the internal token / TLS on every worker call
    dispatcher = Dispatcher(settings, worker_pool, routing, clients, metrics, residency=residency)
    core = (api_keys.core if api_keys else CompletionCore)(dispatcher, tok, tok.info.eos_token_ids, metrics)
    state = RouterState(settings, worker_pool, tok, core, metrics, int(time.time()))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # What startup made (modules, schemas, the tokenizer, the app) lives as long as the
        # process: out of the collector's sight, a full collection walks only what requests and
        # the index made (tens of ms less each on the router's heap).
        gc.collect()
        gc.freeze()
        use_recent(RecentPrompts())  # a session's next turn hashes only its new pages (page_hashes.py)
        try:
            yield
        finally:
            use_recent(None)
            gc.unfreeze()
        await dispatcher.drain()
        await clients.close()
        if residency is not None:
            residency.close()

    app = FastAPI(title="swaserve router", lifespan=lifespan)
    app.state.router = state
    _install_error_handlers(app)
    if api_keys is not None:
        install_api_keys(app, api_keys, metrics.registry)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return _model_card(state)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        def build(req: ChatCompletionRequest) -> tuple[CompletionJob, bool]:
            return chat_job(req, state.tok, state.settings), req.logprobs

        return await _serve(state, request, "/v1/chat/completions", ChatCompletionRequest, build, ChatFormat)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        def build(req: CompletionRequest) -> tuple[CompletionJob, bool]:
            return completion_job(req, state.tok, state.settings), req.logprobs is not None

        return await _serve(state, request, "/v1/completions", CompletionRequest, build, CompletionFormat)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        try:
            prefill, decode = len(worker_pool.prefill_workers()), len(worker_pool.decode_workers())
        except Exception:
            log.exception("worker discovery failed")
            return {"status": "discovery_failed", "prefill_workers": 0, "decode_workers": 0}
        ok = prefill > 0 and decode > 0
        return {"status": "ok" if ok else "no_workers", "prefill_workers": prefill, "decode_workers": decode}

    @app.get("/ready")
    async def ready() -> Response:
        body = readiness(worker_pool)
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def readiness(pool: WorkerPool) -> dict[str, Any]:
    """`GET /ready`: "ready" once discovery has answered (a pool with `synced`) and at least one
    prefill AND one decode worker are routable; else "not_ready" with the reason. /health, the
    liveness probe, answers 200 whatever this says."""
    try:
        synced = bool(getattr(pool, "synced", True))
        prefill, decode = len(pool.prefill_workers()), len(pool.decode_workers())
    except Exception:
        log.exception("worker discovery failed")
        synced, prefill, decode = False, 0, 0
    counts = {"prefill_workers": prefill, "decode_workers": decode}
    for failed, reason in ((not synced, "discovery_not_synced"), (not prefill, "no_prefill_worker"),
                           (not decode, "no_decode_worker")):  # fmt: skip
        if failed:
            return {"status": "not_ready", "reason": reason} | counts
    return {"status": "ready"} | counts


async def _serve(
    state: RouterState,
    request: Request,
    endpoint: str,
    model: type[M],
    build: Callable[[M], tuple[CompletionJob, bool]],
    fmt_cls: type[ChatFormat],
) -> Response:
    arrival = time.monotonic()
    track = RequestTrack(state.metrics, endpoint)
    try:
        req, body = await _parse(request, model)
        _check_model(state, req.model)
        job, logprobs = build(req)
        envelope = Envelope(
            f"{fmt_cls.id_prefix}-{uuid.uuid4().hex}", state.settings.served_model, int(time.time()), logprobs
        )
        fmt = fmt_cls(envelope)
        if req.stream:
            run = await run_or_disconnect(request, state.core.start(job, arrival))
            return StreamSession(run, fmt, req.include_usage, track).response()
        held = state.core.hold_aborts()  # a finished sequence's Abort leaves after the response
        try:
            results, usage = await run_or_disconnect(request, state.core.complete(job, arrival))
            track.done(200)
            return _ReleaseAfterSend(fmt.response(results, usage), held.release, keep=body)
        except BaseException:
            held.release()
            raise
    except RouterError as e:
        track.done(e.status)
        raise
    except ClientGone:
        track.done(CLIENT_CLOSED)
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        track.done(500)
        raise


async def _parse(request: Request, model: type[M]) -> tuple[M, Any]:
    """The validated request, and the parsed JSON it came from (freeing a 32k-id list takes ~0.1 ms:
    the caller may keep it until its response has left)."""
    raw = await request.body()
    fast = _parse_id_prompt(raw, model)
    if fast is not None:
        return fast
    return _parse_json(raw, model)


def _parse_json(raw: bytes, model: type[M]) -> tuple[M, Any]:
    try:
        data = orjson.loads(raw)  # ~3x json.loads on a 32k-token id list
    except orjson.JSONDecodeError as e:
        raise InvalidRequest(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        req = model.model_validate(data, strict=True)  # JSON types as sent: no "7" for 7, no true for 1
    except ValidationError as e:
        raise from_validation_errors(e.errors()) from None
    return req, data


# A request whose "prompt" is a flat list of token ids (an 85k-token agentic prompt: ~500 kB of
# JSON) has that list read by json_ids' C reader straight into the array("I") the schema would
# make, and the rest of the body parsed and validated as usual with a placeholder in its place.
_PROMPT_IDS = re.compile(rb'"prompt"[ \t\n\r]*:[ \t\n\r]*\[')
_PLACEHOLDER = "\x00token-ids-" + os.urandom(12).hex()  # a string no client can have sent
_PLACEHOLDER_JSON = orjson.dumps(_PLACEHOLDER)


def _parse_id_prompt(raw: bytes, model: type[M]) -> tuple[M, Any] | None:
    """`_parse_json(raw, model)`'s answer for a valid request whose top-level "prompt" is a flat
    list of token ids, without a Python int per id; None for anything else (no such prompt, a
    prompt spelled otherwise, an invalid body): the general path parses it and names any error.
    The placeholder must come back as the top-level "prompt" (not a nested or a duplicate key's)."""
    if "prompt" not in model.model_fields or not reader_built():
        return None
    key = _PROMPT_IDS.search(raw)
    if key is None:
        return None
    got = read_id_array(raw, key.end() - 1)
    if got is None:
        return None
    ids, end = got
    try:
        data = orjson.loads(b"".join((raw[: key.end() - 1], _PLACEHOLDER_JSON, raw[end:])))
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("prompt") != _PLACEHOLDER:
        return None
    try:
        req = model.model_validate(data, strict=True)
    except ValidationError:
        return None
    req.prompt = ids  # type: ignore[attr-defined]  # what the schema makes of the ids: an array("I")
    data["prompt"] = ids
    return req, data


class _ReleaseAfterSend(JSONResponse):
    """A JSON response that calls `after()` once sent (or failed to send); it holds `keep` (the
    parsed request) so that it is freed after the answer left, not before."""

    def __init__(self, content: Any, after: Callable[[], None], keep: Any = None) -> None:
        super().__init__(content)
        self._after = after
        self._keep = keep

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._after()


def _check_model(state: RouterState, name: str) -> None:
    if name not in state.settings.model_names:
        raise ModelNotFound(
            f"The model '{name}' does not exist (this router serves '{state.settings.served_model}').",
            param="model",
        )


def _model_card(state: RouterState) -> dict[str, Any]:
    return {
        "id": state.settings.served_model,
        "object": "model",
        "created": state.started,
        "owned_by": "swaserve",
        "max_model_len": state.settings.max_context or state.tok.info.max_context,
    }


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RouterError)
    async def router_error(_: Request, exc: RouterError) -> JSONResponse:
        return JSONResponse(error_body(exc), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = from_validation_errors(list(exc.errors()))
        return JSONResponse(error_body(err), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err: RouterError
        if exc.status_code == 404:
            err = RouteNotFound(f"no route {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}")
        else:
            err = InvalidRequest(str(exc.detail)) if exc.status_code < 500 else RouterError("server error")
            err.status = exc.status_code
        return JSONResponse(error_body(err), status_code=err.status, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(internal_error_body(), status_code=500)
