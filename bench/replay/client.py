"""One streamed completion against an OpenAI-compatible endpoint, timed the way `vllm bench serve` does.

    POST {target}/v1/completions  {"stream": true, "stream_options": {"include_usage": true}, ...}

TTFT is the time to the first chunk with non-empty text; ITL the gaps between successive such
chunks (a chunk may carry several tokens, e.g. with speculative decoding); E2E runs to the end of
the stream. Output tokens come from `usage.completion_tokens` when the server sends it, else one
per text chunk. An HTTP error, an error event in the stream, a broken connection, a payload that is
not JSON or a timeout makes the request failed, with its message; nothing is raised.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

from bench.replay.plan import PlannedRequest
from bench.replay.prompts import PromptMode

ERROR_TEXT_LIMIT = 300


@dataclass(frozen=True)
class Endpoint:
    target: str  # base URL, e.g. http://127.0.0.1:8000
    model: str
    prompt_mode: PromptMode = "ids"
    ignore_eos: bool = True
    timeout_s: float = 3600.0  # per request, whole stream
    api_key: str | None = None
    extra_body: tuple[tuple[str, Any], ...] = ()  # merged into every request body
    replicas: tuple[str, ...] = ()  # more base URLs: the k-th request sent goes to bases[k % len(bases)]

    @property
    def bases(self) -> tuple[str, ...]:
        """Every base URL, in round-robin order (router replicas with no balancer in front)."""
        return (self.target, *self.replicas)

    @property
    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def body(self, req: PlannedRequest, prompt: list[int] | str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": req.output_length,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        body.update(self.extra_body)
        return body


@dataclass(frozen=True)
class RequestResult:
    """What one request measured; times in seconds, `started_s` from the replay's start."""

    index: int
    scheduled_s: float
    started_s: float
    input_length: int  # sent
    output_length: int  # asked for
    ok: bool
    error: str = ""
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itl_s: tuple[float, ...] = ()
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int | None = None  # None: the server did not report prompt_tokens_details

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (output tokens - 1), for requests with more than one output token."""
        if not self.ok or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class _Stream:
    """Accumulates one SSE stream; `feed` takes each `data:` payload with its arrival time."""

    start: float
    first_token: float | None = None
    last_token: float | None = None
    itl: list[float] = field(default_factory=list)
    text_chunks: int = 0
    usage: dict[str, Any] | None = None
    error: str = ""

    def feed(self, payload: str, now: float) -> bool:
        """False once the stream is over (`[DONE]` or an error event)."""
        if payload == "[DONE]":
            return False
        obj = orjson.loads(payload)
        if not isinstance(obj, dict):
            return True
        if obj.get("error"):
            err = obj["error"]
            self.error = str(err.get("message", err) if isinstance(err, dict) else err)
            return False
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or ():
            if choice.get("text"):
                self._token(now)
        return True

    def _token(self, now: float) -> None:
        if self.first_token is None:
            self.first_token = now
        else:
            assert self.last_token is not None
            self.itl.append(now - self.last_token)
        self.last_token = now
        self.text_chunks += 1


async def served_model(http: httpx.AsyncClient) -> str:
    """The first model the endpoint lists at /v1/models."""
    r = await http.get("/v1/models")
    r.raise_for_status()
    models = r.json().get("data") or []
    if not models:
        raise ValueError(f"{http.base_url}/v1/models lists no model: pass --model")
    return str(models[0]["id"])


async def send(
    http: httpx.AsyncClient,
    ep: Endpoint,
    req: PlannedRequest,
    prompt: list[int] | str,
    t0: float,
    base: str | None = None,
) -> RequestResult:
    """Send one request now; `t0` is the replay's start on the perf_counter clock. `base`: the base
    URL to send to (one of `ep.bases`), else the client's own."""
    content = orjson.dumps(ep.body(req, prompt))
    start = time.perf_counter()
    stream = _Stream(start)
    common: dict[str, Any] = {
        "index": req.index,
        "scheduled_s": req.send_at_s,
        "started_s": start - t0,
        "input_length": req.input_length,
        "output_length": req.output_length,
    }
    try:
        async with asyncio.timeout(ep.timeout_s):
            url = f"{base}/v1/completions" if base else "/v1/completions"
            async with http.stream("POST", url, content=content, headers=ep.headers) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    return RequestResult(ok=False, error=f"HTTP {r.status_code}: {_clip(text)}", **common)
                async for line in r.aiter_lines():
                    if line.startswith("data:") and not stream.feed(line[5:].strip(), time.perf_counter()):
                        break
    except Exception as e:  # HTTP / stream / JSON errors, timeouts: a failed request, never a failed run
        return RequestResult(ok=False, error=_clip(f"{type(e).__name__}: {e}"), **common)
    end = time.perf_counter()
    return _result(stream, end, common)


def _result(stream: _Stream, end: float, common: dict[str, Any]) -> RequestResult:
    if stream.error:
        return RequestResult(ok=False, error=f"stream error: {_clip(stream.error)}", **common)
    if stream.first_token is None:
        return RequestResult(ok=False, error="the stream ended without any token", **common)
    usage = stream.usage or {}
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    return RequestResult(
        ok=True,
        ttft_s=stream.first_token - stream.start,
        e2e_s=end - stream.start,
        itl_s=tuple(stream.itl),
        prompt_tokens=int(usage.get("prompt_tokens") or common["input_length"]),
        output_tokens=int(usage.get("completion_tokens") or stream.text_chunks),
        cached_tokens=None if cached is None else int(cached),
        **common,
    )


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_TEXT_LIMIT else text[:ERROR_TEXT_LIMIT] + "..."
