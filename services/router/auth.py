"""API keys and per-key rate limits on the router's HTTP API (docs/security.md).

    at the door (ApiKeyMiddleware)  every path but /health, /ready, /metrics needs
                                    `Authorization: Bearer <key>`: missing, unknown or revoked -> 401;
                                    one request counted against the key's rpm -> 429 past it (or
                                    while the window's tokens are spent)
    once tokenized (MeteredCore)    prompt tokens + max_tokens per choice reserved against tpm ->
                                    429 past it; what the request did not generate is refunded
                                    when its answer ends

Both refusals are OpenAI error objects; 429 carries Retry-After (the seconds left in the window).
Redis down: requests pass unlimited (logged, `swaserve_router_rate_limit_unavailable_total`),
and keys are checked against the last loaded set (key_set.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncGenerator, Collection
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from services.common.api_keys import ApiKey
from services.common.rate_limit import Charge, RateLimiter, RateLimitUnavailable, Verdict
from services.router.completion import CompletionCore, CompletionRun
from services.router.dispatch import Dispatcher
from services.router.errors import RouterError, error_body
from services.router.job import ChoiceEvent, CompletionJob
from services.router.key_set import KeySet, KeySetCollector
from services.router.metrics import RouterMetrics
from services.router.textstream import TokenText

log = logging.getLogger("swaserve.router.auth")

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # probes and Prometheus carry no key
CURRENT_KEY: contextvars.ContextVar[ApiKey | None] = contextvars.ContextVar("swaserve_api_key", default=None)


class Unauthorized(RouterError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RateLimited(RouterError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, retry_after: int) -> None:
        super().__init__(message)
        self.type = kind  # OpenAI names the exhausted budget: "requests" | "tokens"
        self.retry_after = max(1, retry_after)


def bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


@dataclass
class ApiKeyGate:
    """What the router checks: `keys` (refreshed in the background), `limiter` (None: no limits)."""

    keys: KeySet
    limiter: RateLimiter | None = None
    _rejected: Any = None
    _unavailable: Any = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _last_warning: float = 0.0

    def bind(self, registry: CollectorRegistry) -> None:
        self._rejected = Counter(
            "swaserve_router_auth_rejected", "requests refused by the key check or a rate limit",
            ["reason"], registry=registry,
        )  # fmt: skip
        for reason in ("missing_key", "unknown_key", "revoked_key", "requests", "tokens", "too_large"):
            self._rejected.labels(reason=reason)
        self._unavailable = Counter(
            "swaserve_router_rate_limit_unavailable", "requests let through unlimited: Redis unreachable",
            registry=registry,
        )  # fmt: skip
        registry.register(KeySetCollector(self.keys))

    def check_key(self, key: str | None) -> ApiKey:
        if key is None:
            raise self._reject("missing_key", "Missing API key: send 'Authorization: Bearer <key>'.")
        rec = self.keys.lookup(key)
        if rec is None:
            raise self._reject("unknown_key", "Incorrect API key provided.")
        if not rec.active:
            raise self._reject("revoked_key", "This API key has been revoked.")
        return rec

    def _reject(self, reason: str, message: str) -> Unauthorized:
        if self._rejected is not None:
            self._rejected.labels(reason=reason).inc()
        return Unauthorized(message)

    async def admit(self, rec: ApiKey, requests: int = 0, tokens: int = 0) -> Charge | None:
        """Count a request or reserve tokens; RateLimited past a limit; None when nothing was counted."""
        if self.limiter is None or (requests and not rec.rpm and not rec.tpm) or (tokens and not rec.tpm):
            return None
        try:
            verdict = await self.limiter.admit(
                rec.key_hash, rec.rpm, rec.tpm, requests=requests, tokens=tokens
            )
        except RateLimitUnavailable as e:
            self._fail_open(e)
            return None
        if not verdict.allowed:
            raise self._limited(rec, verdict, tokens)
        return Charge(rec.key_hash, verdict.window, tokens) if tokens else None

    def _limited(self, rec: ApiKey, v: Verdict, tokens: int) -> RateLimited:
        if self._rejected is not None:
            self._rejected.labels(reason=v.limit).inc()
        if v.limit == "requests":
            msg, kind = (
                f"Rate limit reached for key '{rec.name}' on requests per min: limit {rec.rpm}.",
                "requests",
            )
        elif v.limit == "too_large":
            msg, kind = (
                f"Request too large for key '{rec.name}': {tokens} tokens, limit {rec.tpm} per min.",
                "tokens",
            )
        else:
            msg, kind = (
                f"Rate limit reached for key '{rec.name}' on tokens per min: limit {rec.tpm}.",
                "tokens",
            )
        return RateLimited(msg + f" Try again in {v.retry_after}s.", kind=kind, retry_after=v.retry_after)

    def _fail_open(self, e: Exception) -> None:
        if self._unavailable is not None:
            self._unavailable.inc()
        now = time.monotonic()
        if now - self._last_warning > 10.0:
            self._last_warning = now
            log.warning("rate limits: Redis unreachable (%s); requests pass unlimited until it answers", e)

    def refund_later(self, charge: Charge, tokens: int) -> None:
        if self.limiter is None or tokens <= 0:
            return
        task = asyncio.ensure_future(self._refund(charge, tokens))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refund(self, charge: Charge, tokens: int) -> None:
        assert self.limiter is not None
        try:
            await self.limiter.refund(charge, tokens)
        except RateLimitUnavailable as e:
            self._fail_open(e)

    def core(
        self, dispatcher: Dispatcher, tok: TokenText, eos: frozenset[int], metrics: RouterMetrics
    ) -> CompletionCore:
        return MeteredCore(dispatcher, tok, eos, metrics, self)

    async def close(self) -> None:
        self.keys.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.limiter is not None:
            await self.limiter.close()


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, gate: ApiKeyGate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            rec = self.gate.check_key(bearer(scope))
            await self.gate.admit(rec, requests=1)
        except RouterError as e:
            await refusal(e)(scope, receive, send)
            return
        token = CURRENT_KEY.set(rec)
        try:
            await self.app(scope, receive, send)
        finally:
            CURRENT_KEY.reset(token)


def refusal(e: RouterError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else {}
    if isinstance(e, RateLimited):
        headers["Retry-After"] = str(e.retry_after)
    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


class MeteredCore(CompletionCore):
    """CompletionCore that reserves a job's tokens against the caller's key before opening it."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        tok: TokenText,
        eos: frozenset[int],
        metrics: RouterMetrics,
        gate: ApiKeyGate,
    ) -> None:
        super().__init__(dispatcher, tok, eos, metrics)
        self.gate = gate

    async def start(
        self, job: CompletionJob, arrival: float | None = None, avoid: Collection[str] = ()
    ) -> CompletionRun:
        """A rerun after a worker died (`avoid` set: CompletionCore.complete) is admitted again: the
        failed run was settled with the tokens it used, the rerun reserves its own."""
        rec = CURRENT_KEY.get()
        charge = None if rec is None else await self.gate.admit(rec, tokens=job_tokens(job))
        run = _MeteredRun(self, job, time.monotonic() if arrival is None else arrival, charge, avoid)
        try:
            await run.open()
        except BaseException:
            if charge is not None:
                self.gate.refund_later(charge, charge.tokens)
            raise
        return run


def job_tokens(job: CompletionJob) -> int:
    """What a job may cost at most: its prompts once, and max_tokens for every choice."""
    return sum(len(p) for p in job.prompts) + job.sampling.max_tokens * job.num_choices


class _MeteredRun(CompletionRun):
    def __init__(
        self, core: MeteredCore, job: CompletionJob, arrival: float, charge: Charge | None,
        avoid: Collection[str] = (),
    ) -> None:  # fmt: skip
        super().__init__(core, job, arrival, avoid)
        self._gate = core.gate
        self._charge = charge

    async def events(self) -> AsyncGenerator[ChoiceEvent, None]:
        try:
            async with aclosing(super().events()) as events:
                async for ev in events:
                    yield ev
        finally:
            self._settle()

    def close(self) -> None:
        super().close()
        self._settle()  # a run closed before (or without) reading its events

    def _settle(self) -> None:
        """Once: give back what the reservation held beyond the tokens used."""
        if self._charge is not None:
            u = self.usage()
            self._gate.refund_later(self._charge, self._charge.tokens - u.prompt_tokens - u.completion_tokens)
            self._charge = None


def install_api_keys(app: FastAPI, gate: ApiKeyGate, registry: CollectorRegistry) -> None:
    """Keys checked on every path but OPEN_PATHS; 429s raised past the door answered with Retry-After."""
    gate.bind(registry)
    app.add_middleware(ApiKeyMiddleware, gate=gate)

    async def rate_limited(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RouterError)
        return refusal(exc)

    app.add_exception_handler(RateLimited, rate_limited)
