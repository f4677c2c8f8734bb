"""HTTP plumbing around a CompletionRun: Server-Sent Events, client disconnects, request accounting.

A started run holds reservations on workers, so every path out of a request releases it: the SSE
body's own cleanup, the response's close hook (also when the body never started), and for
non-streaming requests a watcher that cancels the work when the client goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.router.completion import CompletionRun
from services.router.errors import RouterError, error_body, internal_error_body
from services.router.metrics import RouterMetrics
from services.router.responses import SSE_DONE, ChatFormat, sse

log = logging.getLogger("swaserve.router")

T = TypeVar("T")
CLIENT_CLOSED = 499  # nginx's "client closed request", for the request counter only


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


class RequestTrack:
    """In-flight gauge and the request counter for one HTTP request; `done` counts once."""

    def __init__(self, metrics: RouterMetrics, endpoint: str) -> None:
        self._metrics = metrics
        self._endpoint = endpoint
        self._done = False
        metrics.inflight.inc()

    def done(self, status: int) -> None:
        if self._done:
            return
        self._done = True
        self._metrics.inflight.dec()
        self._metrics.requests.labels(endpoint=self._endpoint, status=str(status)).inc()


async def run_or_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (and raising ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class SSEResponse(StreamingResponse):
    """A StreamingResponse that always runs `on_close`, even if its body never started."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self._on_close()


class StreamSession:
    """One streamed answer: opening chunks, a chunk per event, usage, then `[DONE]`.

    A failure after the first chunk ends the stream with an OpenAI error object as an event.
    """

    def __init__(self, run: CompletionRun, fmt: ChatFormat, include_usage: bool, track: RequestTrack) -> None:
        self._run = run
        self._fmt = fmt
        self._include_usage = include_usage
        self._track = track

    def response(self) -> SSEResponse:
        return SSEResponse(self._body(), on_close=self.close)

    def close(self) -> None:
        self._run.close()
        self._track.done(CLIENT_CLOSED)  # no-op when the body already counted the request

    async def _body(self) -> AsyncIterator[str]:
        status = CLIENT_CLOSED
        try:
            for chunk in self._fmt.opening(self._run.job.num_choices):
                yield self._sse(chunk)
            async with contextlib.aclosing(self._run.events()) as events:
                async for ev in events:
                    for event_chunk in self._fmt.events(ev):
                        yield self._sse(event_chunk)
            if self._include_usage:
                yield sse(self._fmt.usage_chunk(self._run.usage()))
            status = 200
        except RouterError as e:
            status = e.status
            yield sse(error_body(e))
        except Exception:
            log.exception("stream failed")
            status = 500
            yield sse(internal_error_body())
        finally:
            self._track.done(status)
        yield SSE_DONE

    def _sse(self, chunk: dict[str, Any]) -> str:
        if self._include_usage:
            chunk["usage"] = None
        return sse(chunk)
