"""The open-loop schedule: every request starts at its own time, whatever the others are doing.

A dispatcher sleeps until each request's `send_at_s` and starts it as a task; a slow server makes
requests pile up in flight, never arrive later (unless `concurrency` caps the requests in flight,
then a request waits for a slot and its latencies count from when it was actually sent). The
prompt is built just before the request goes out, so a long replay holds no prompts in memory.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from dataclasses import dataclass

import httpx

from bench.replay.client import Endpoint, RequestResult, send
from bench.replay.plan import PlannedRequest
from bench.replay.prompts import PromptBuilder

CONNECT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ReplayRun:
    results: tuple[RequestResult, ...]  # in send order
    duration_s: float  # from the first scheduled send to the last completion


def http_client(ep: Endpoint) -> httpx.AsyncClient:
    """No connection cap (httpx's default of 100 would queue an open-loop replay)."""
    return httpx.AsyncClient(
        base_url=ep.target,
        timeout=httpx.Timeout(ep.timeout_s, connect=CONNECT_TIMEOUT_S),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
    )


async def replay(
    http: httpx.AsyncClient,
    ep: Endpoint,
    planned: Sequence[PlannedRequest],
    builder: PromptBuilder,
    concurrency: int | None = None,
    on_done: Callable[[RequestResult], None] | None = None,
) -> ReplayRun:
    slots = asyncio.Semaphore(concurrency) if concurrency else None
    t0 = time.perf_counter()

    bases = ep.bases

    async def one(req: PlannedRequest, base: str | None) -> RequestResult:
        gate: AbstractAsyncContextManager[object] = slots if slots is not None else nullcontext()
        async with gate:
            result = await send(http, ep, req, builder.prompt(req, ep.prompt_mode), t0, base)
        if on_done is not None:
            on_done(result)
        return result

    tasks = []
    for k, req in enumerate(planned):  # several bases: round-robin in send order
        delay = t0 + req.send_at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(req, bases[k % len(bases)] if len(bases) > 1 else None)))
    results = await asyncio.gather(*tasks)
    return ReplayRun(tuple(results), time.perf_counter() - t0)
