"""The HTTP API of a simulated worker (role `both`): what sglang-router and vllm-router expect of a worker.

    GET  /health /health_generate              200 while serving
    GET  /server_info /get_server_info         capacity, cost model, load, CPU per request; simulated
    GET  /model_info /get_model_info /v1/models
    GET  /get_load /metrics
    POST /generate                             SGLang native (text or input_ids, sampling_params)
    POST /v1/completions /v1/chat/completions  OpenAI, stream and not, usage with cached_tokens
    POST /tokenize /detokenize /v1/completions/render   word tokens (vllm-router cache_aware asks these)

Any other path answers 404 and is logged, so a router probing something new shows up in the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench.sim.engine import PrefillFailed, SimEngineConfig
from bench.sim.http_api import (
    BadRequest,
    GenRequest,
    OpenAIEnvelope,
    error_body,
    generate_body,
    parse_chat,
    parse_completion,
    parse_generate,
    usage,
)
from bench.sim.serving import SimServing
from bench.sim.stats import SimStats
from bench.word_tokens import ids_to_text, text_to_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpWorkerInfo:
    model: str
    worker_id: str
    engine: SimEngineConfig
    time_scale: float


def json_response(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def sse(body: Any) -> bytes:
    return b"data: " + (body if isinstance(body, bytes) else orjson.dumps(body)) + b"\n\n"


def bad_request(e: BadRequest | ValueError) -> Response:
    return json_response(error_body(str(e), getattr(e, "param", None)), 400)


async def read_json(request: Request) -> Mapping[str, Any]:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(body, Mapping):
        raise BadRequest("body must be a JSON object")
    return body


class _LogRequests:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            log.debug(
                "%s %s on port %s", scope["method"], scope["path"], (scope.get("server") or ("", ""))[1]
            )
        await self.app(scope, receive, send)


class SimHttpWorker:
    def __init__(self, serving: SimServing, info: HttpWorkerInfo, stats: SimStats) -> None:
        self.serving = serving
        self.info = info
        self.stats = stats

    # -- completions ---------------------------------------------------------------------------
    async def _first(self, req: GenRequest) -> tuple[int, int]:
        """(first token, cached tokens); raises BadRequest for prompts the engine refuses."""
        if len(req.prompt_ids) + req.max_tokens > self.info.engine.max_context:
            raise BadRequest(
                f"prompt ({len(req.prompt_ids)}) + max tokens ({req.max_tokens}) exceed the context "
                f"({self.info.engine.max_context})"
            )
        try:
            out = await self.serving.open(req.rid, req.prompt_ids)
        except (ValueError, PrefillFailed) as e:
            raise BadRequest(str(e)) from None
        return out.first_token, out.cached_tokens

    async def generate(self, request: Request) -> Response:
        started = time.monotonic()
        try:
            req = parse_generate(await read_json(request))
            first, cached = await self._first(req)
        except BadRequest as e:
            return bad_request(e)
        out = [first]
        if not req.stream:
            async for chunk in self.serving.rest(req.prompt_ids, req.max_tokens):
                out += chunk.token_ids
            return json_response(generate_body(req, out, cached, "length", started))

        async def events() -> AsyncIterator[bytes]:
            yield sse(generate_body(req, out, cached, "length" if req.max_tokens <= 1 else None, started))
            async for chunk in self.serving.rest(req.prompt_ids, req.max_tokens):
                out.extend(chunk.token_ids)
                yield sse(generate_body(req, out, cached, chunk.finish_reason or None, started))
            yield sse(b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, parse_completion, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._openai(request, parse_chat, chat=True)

    async def _openai(
        self, request: Request, parse: Callable[[Mapping[str, Any]], GenRequest], chat: bool
    ) -> Response:
        try:
            req = parse(await read_json(request))
            first, cached = await self._first(req)
        except BadRequest as e:
            return bad_request(e)
        env = OpenAIEnvelope.of(req, self.info.model, chat)
        prompt_len = len(req.prompt_ids)
        if not req.stream:
            out = [first]
            async for chunk in self.serving.rest(req.prompt_ids, req.max_tokens):
                out += chunk.token_ids
            return json_response(env.response(out, "length", usage(prompt_len, len(out), cached)))

        async def events() -> AsyncIterator[bytes]:
            n = 1
            yield sse(env.chunk([first], "length" if req.max_tokens <= 1 else None))
            async for chunk in self.serving.rest(req.prompt_ids, req.max_tokens):
                n = chunk.completion_tokens
                yield sse(env.chunk(chunk.token_ids, chunk.finish_reason or None))
            if req.include_usage:
                yield sse(env.usage_chunk(usage(prompt_len, n, cached)))
            yield sse(b"[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # -- tokens --------------------------------------------------------------------------------
    async def tokenize(self, request: Request) -> Response:
        try:
            body = await read_json(request)
            ids = self._prompt_of(body)
        except BadRequest as e:
            return bad_request(e)
        return json_response(
            {
                "count": len(ids),
                "max_model_len": self.info.engine.max_context,
                "tokens": ids,
                "token_strs": None,
            }
        )

    async def detokenize(self, request: Request) -> Response:
        try:
            body = await read_json(request)
        except BadRequest as e:
            return bad_request(e)
        tokens = body.get("tokens") or []
        return json_response({"prompt": ids_to_text(int(t) for t in tokens)})

    async def render(self, request: Request) -> Response:
        """vLLM's /v1/completions/render: the prompt as token ids (a list of GenerateRequest)."""
        try:
            body = await read_json(request)
            ids = self._prompt_of(body)
        except BadRequest as e:
            return bad_request(e)
        max_tokens = body.get("max_tokens") or 16
        return json_response(
            [{"request_id": f"render-{time.monotonic_ns()}", "token_ids": ids, "model": self.info.model,
              "sampling_params": {"max_tokens": max_tokens}, "stream": False}]
        )  # fmt: skip

    @staticmethod
    def _prompt_of(body: Mapping[str, Any]) -> list[int]:
        if "messages" in body:
            return parse_chat(body).prompt_ids
        prompt = body.get("prompt", body.get("text"))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [int(t) for t in prompt]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string or a list of token ids", "prompt")
        return text_to_ids(prompt)

    # -- information ---------------------------------------------------------------------------
    def _load(self) -> dict[str, int]:
        load = self.serving.engine.load
        return {"running": load.running, "waiting": load.waiting, "decoding": self.serving.decoding,
                "free_kv_tokens": load.free_tokens, "queued_tokens": load.queued_tokens}  # fmt: skip

    async def health(self, request: Request) -> Response:
        return Response(b"", status_code=200)

    async def server_info(self, request: Request) -> Response:
        e = self.info.engine
        cost = self.serving.cost
        return json_response({
            "simulated": True, "worker_id": self.info.worker_id, "version": "swaserve-sim",
            "model_path": self.info.model, "served_model_name": self.info.model, "tokenizer_path": None,
            "page_size": e.page_size, "sliding_window_size": e.window, "max_total_num_tokens": e.max_total_tokens,
            "chunked_prefill_size": e.chunk_size, "max_prefill_tokens": e.max_batch_tokens,
            "max_running_requests": e.max_running, "schedule_policy": e.queue_policy,
            "context_length": e.max_context, "dp_size": 1, "tp_size": 1, "time_scale": self.info.time_scale,
            "cost_model": {"decode_tpot_s": cost.decode_tpot_s, "step_overhead_s": cost.step_overhead_s,
                           "effective_flops": cost.effective_flops, "kv_link_bytes_per_s": cost.kv_link_bytes_per_s,
                           "prefill_tokens_per_s_2k": round(cost.prefill_tokens_per_s())},
            "engine": asdict(e), "load": self._load(), "sim_cpu": self.stats.snapshot(),
        })  # fmt: skip

    async def model_info(self, request: Request) -> Response:
        return json_response({"model_path": self.info.model, "tokenizer_path": None, "is_generation": True,
                              "simulated": True})  # fmt: skip

    async def models(self, request: Request) -> Response:
        data = [{"id": self.info.model, "object": "model", "created": 0, "owned_by": "swaserve-sim",
                 "root": self.info.model, "max_model_len": self.info.engine.max_context}]  # fmt: skip
        return json_response({"object": "list", "data": data})

    async def get_load(self, request: Request) -> Response:
        load = self._load()
        return json_response({"load": load["running"] + load["waiting"] + load["decoding"], **load})

    async def metrics(self, request: Request) -> Response:
        load, cpu = self._load(), self.stats.snapshot()
        lines = [f'swaserve_sim_{k}{{worker="{self.info.worker_id}"}} {v}' for k, v in load.items()]
        lines += [f"swaserve_sim_process_{k} {v}" for k, v in cpu.items()]
        return Response(("\n".join(lines) + "\n").encode(), media_type="text/plain; version=0.0.4")

    async def not_found(self, request: Request) -> Response:
        level = logging.DEBUG if request.method == "PRI" else logging.WARNING  # an HTTP/2 probe (smg)
        log.log(level, "sim worker %s: %s %s is not served here (404)", self.info.worker_id, request.method,
                    request.url.path)  # fmt: skip
        return json_response(error_body(f"{request.url.path} not found", kind="not_found_error"), 404)

    def app(self) -> Starlette:
        get, post = ["GET"], ["POST"]
        routes = [
            Route("/health", self.health, methods=get), Route("/health_generate", self.health, methods=get),
            Route("/server_info", self.server_info, methods=get), Route("/get_server_info", self.server_info, methods=get),
            Route("/model_info", self.model_info, methods=get), Route("/get_model_info", self.model_info, methods=get),
            Route("/v1/models", self.models, methods=get), Route("/get_load", self.get_load, methods=get),
            Route("/metrics", self.metrics, methods=get),
            Route("/generate", self.generate, methods=post), Route("/v1/completions", self.completions, methods=post),
            Route("/v1/chat/completions", self.chat, methods=post), Route("/tokenize", self.tokenize, methods=post),
            Route("/detokenize", self.detokenize, methods=post), Route("/v1/completions/render", self.render, methods=post),
        ]  # fmt: skip
        app = Starlette(routes=routes, exception_handlers={404: self._on_404, 405: self._on_404})
        if log.isEnabledFor(logging.DEBUG):  # --log-level DEBUG: every request, to see what a router asks
            app.add_middleware(_LogRequests)
        return app

    async def _on_404(self, request: Request, exc: Exception) -> Response:
        return await self.not_found(request)
