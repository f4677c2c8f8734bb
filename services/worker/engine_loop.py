"""One thread that owns an Engine; other threads (gRPC handlers) talk to it through queues.

    handler threads                         loop thread (the only one that touches the engine)
    ---------------                         ------------------------------------------------
    add_request / add_prefilled / abort --> inbox --> run the command between two steps
                                                      step() -> per-request events
    handle.events  <------------------------------------ ReqEvent(tokens | finish | error)

The loop: drain the inbox (blocking only when the engine is idle), step once, run `after_step`
(the prefill worker publishes its KV cache events there; it runs every 0.5 s when idle too),
publish a LoopStats snapshot, repeat. Every command runs between two steps, so a request is never
changed while a forward reads it. `on_finish(engine, req)` runs on the loop thread inside the
engine's finish_hook, before the request's pages are released (the prefill worker exports its KV
there); its result travels in the request's last event.

Failures: an exception inside step() fails every running request (the batch is a subset of them)
with an error event and drops their KV without caching it; waiting requests and later ones are
served as usual. An exception in on_finish fails only that request.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from services.common.kv_payload import KVPayload
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine
from services.engine.request import Req, ReqStatus
from services.engine.sampling import Sampled

log = logging.getLogger(__name__)
T = TypeVar("T")
OnFinish = Callable[[Engine, Req], Any]


class EngineStopped(RuntimeError):
    """The loop is not running (stopped, or never started)."""


@dataclass(frozen=True)
class ReqEvent:
    """Something that happened to one request; the last event has `finished` set."""

    rid: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    completion_tokens: int = 0  # output tokens so far, this event's included
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last event
    matched_stop: str | int | None = None
    error: str | None = None  # the engine failed this request (last event)
    result: Any = None  # what on_finish returned (last event)
    cached_len: int = 0  # prompt tokens that came from the prefix cache
    cached_l2: int = 0  # of cached_len, restored from the host tier (L2)
    cached_l3: int = 0  # of cached_len, fetched from L3 (GCache) through L2
    at: float = field(default_factory=time.monotonic)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class RequestHandle:
    """A handler's view of one request: its events, and when it was queued / admitted."""

    def __init__(self, rid: str, on_finish: OnFinish | None = None) -> None:
        self.rid = rid
        self.events: queue.Queue[ReqEvent] = queue.Queue()
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None  # loop thread: first step that scheduled it
        self.on_finish = on_finish
        self._finish_result: Any = None
        self._finish_error: str | None = None

    def next_events(self, timeout: float | None = None) -> list[ReqEvent]:
        """Block for one event (queue.Empty after `timeout`), then take whatever else is queued."""
        out = [self.events.get(timeout=timeout)]
        while not out[-1].finished:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                break
        return out

    def __iter__(self) -> Iterator[ReqEvent]:
        while True:
            ev = self.events.get()
            yield ev
            if ev.finished:
                return

    def wait_finished(self, timeout: float | None = None) -> ReqEvent:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ev = self.events.get(timeout=left)
            if ev.finished:
                return ev


@dataclass(frozen=True)
class LoopStats:
    running: int = 0
    waiting: int = 0
    free_tokens: int = 0  # KV tokens the full pool can still take (free + evictable)
    capacity_tokens: int = 0
    queued_tokens: int = 0  # prompt tokens admitted or waiting but not computed yet
    growth_tokens: int = 0  # KV tokens the current requests may still claim (up to max_tokens)
    steps: int = 0
    failed_steps: int = 0
    alive: bool = False


def default_torch_threads() -> int:
    env = os.environ.get("SWASERVE_TORCH_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)))


class EngineLoop:
    def __init__(self, engine: Engine, threads: int | None = None, name: str = "engine-loop") -> None:
        self.engine = engine
        self.threads = threads
        self.name = name
        self._inbox: queue.Queue[tuple[Callable[[Engine], Any], Future[Any]] | None] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}  # loop thread only
        self._reqs: dict[str, Req] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._lock = threading.Lock()  # orders call()'s check-and-put against the shutdown drain
        self._steps = self._failed_steps = 0
        self.stats = LoopStats()
        self.after_step: Callable[[Engine], None] | None = None  # loop thread, after every iteration
        engine.finish_hook = self._on_engine_finish

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> EngineLoop:
        if self._thread is not None:
            raise RuntimeError("already started")
        self._publish_stats()  # valid from the start (the thread does not run yet: no race)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current step, fail every outstanding request ("engine stopped"), join."""
        if self._thread is None:
            return
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- commands (any thread) -----------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T]) -> Future[T]:
        """Run fn(engine) on the loop thread between two steps."""
        fut: Future[T] = Future()
        with self._lock:
            if not self.alive:
                fut.set_exception(EngineStopped(f"{self.name} is not running"))
                return fut
            self._inbox.put((fn, fut))
        return fut

    def add_request(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        rid: str,
        on_finish: OnFinish | None = None,
        timeout: float | None = 60.0,
    ) -> RequestHandle:
        """Queue a request; raises ValueError (bad input, duplicate rid) as engine.add_request does."""
        handle = RequestHandle(rid, on_finish)

        def add(engine: Engine) -> RequestHandle:
            self._check_new(rid)
            req = engine.add_request(prompt_ids, params, rid=rid)
            self._track(handle, req)
            self._publish_stats()  # callers read the new load at once (admission control)
            return handle

        return self.call(add).result(timeout)

    def add_prefilled(
        self,
        prompt_ids: Sequence[int],
        first: Sampled,
        payload: KVPayload,
        params: SamplingParams,
        timeout: float | None = 60.0,
    ) -> RequestHandle:
        """Install KV computed elsewhere and decode on; raises OutOfPages / ValueError as the engine does.

        If the first token already ends the request, the handle's only event is the finish.
        """
        rid = payload.meta.rid
        handle = RequestHandle(rid)

        def add(engine: Engine) -> RequestHandle:
            self._check_new(rid)
            req = engine.add_prefilled(prompt_ids, first, payload, params)
            handle.admitted_at = time.monotonic()
            if req.finished:  # the first token (already sent by the prefill worker) ends it
                handle.events.put(
                    ReqEvent(
                        rid,
                        completion_tokens=1,
                        finish_reason=req.finish_reason.value if req.finish_reason else None,
                        matched_stop=req.matched_stop,
                    )
                )
            else:
                self._track(handle, req)
            self._publish_stats()
            return handle

        return self.call(add).result(timeout)

    def abort(self, rid: str, timeout: float | None = 10.0) -> bool:
        """Abort a queued or running request; False if the loop does not know it (finished, never seen)."""
        return self.call(lambda engine: self._abort(engine, rid)).result(timeout)

    # -- loop thread ---------------------------------------------------------------------------
    def _check_new(self, rid: str) -> None:
        if rid in self._handles:
            raise ValueError(f"request id {rid!r} is already in flight on this worker")

    def _track(self, handle: RequestHandle, req: Req) -> None:
        self._handles[req.rid] = handle
        self._reqs[req.rid] = req

    def _untrack(self, rid: str) -> RequestHandle | None:
        self._reqs.pop(rid, None)
        return self._handles.pop(rid, None)

    def _abort(self, engine: Engine, rid: str) -> bool:
        req = self._reqs.get(rid)
        if req is None:
            return False
        engine.abort(req)
        handle = self._untrack(rid)
        if handle is not None:
            handle.events.put(self._final_event(req, handle))
        return True

    def _run(self) -> None:
        torch.set_num_threads(self.threads or default_torch_threads())
        log.info("%s: serving with %d torch threads", self.name, torch.get_num_threads())
        try:
            while not self._stopping:
                self._drain_inbox(block=not self.engine.has_work())
                if self._stopping:
                    break
                if self.engine.has_work():
                    self._step()
                self._publish_stats()  # before the hooks: they may publish the load (serve.py)
                self._run_after_step()
        finally:
            self._stopping = True
            self._shutdown()

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is None:
                self._stopping = True
                return
            fn, fut = item
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.engine))
                except BaseException as e:  # noqa: BLE001 - delivered to the caller
                    fut.set_exception(e)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        engine = self.engine
        started = time.monotonic()
        try:
            reqs = engine.step()
        except Exception as e:  # noqa: BLE001 - fail the batch, keep serving
            self._failed_steps += 1
            log.exception(
                "%s: engine step failed; failing %d running request(s)",
                self.name,
                len(engine.scheduler.running),
            )
            self._fail_running(f"engine step failed: {type(e).__name__}: {e}")
            return
        self._steps += 1
        for rid, h in self._handles.items():
            if h.admitted_at is None and self._reqs[rid].status is not ReqStatus.WAITING:
                h.admitted_at = started
        for req in reqs:
            handle = self._handles.get(req.rid)
            if handle is None:
                continue
            if req.finished:
                self._untrack(req.rid)
                handle.events.put(self._final_event(req, handle))
            else:
                handle.events.put(
                    ReqEvent(
                        req.rid,
                        (req.output_ids[-1],),
                        (req.output_logprobs[-1],),
                        completion_tokens=len(req.output_ids),
                        cached_len=req.cached_len,
                        cached_l2=req.cached_l2,
                        cached_l3=req.cached_l3,
                    )
                )
        if not reqs and not engine.scheduler.running and engine.scheduler.waiting:
            # nothing runs and the head of the queue cannot be admitted: it never will be
            for req in list(engine.scheduler.waiting):
                self._fail(req, "the KV pools cannot hold this request")

    def _run_after_step(self) -> None:
        hook = self.after_step
        if hook is not None:
            try:
                hook(self.engine)
            except Exception:  # noqa: BLE001 - a hook never takes the loop down
                log.exception("%s: after_step hook failed", self.name)

    def _final_event(self, req: Req, handle: RequestHandle) -> ReqEvent:
        sampled = (
            bool(req.output_ids) and req.finish_reason is not None and req.finish_reason.value != "abort"
        )
        return ReqEvent(
            req.rid,
            (req.output_ids[-1],) if sampled else (),
            (req.output_logprobs[-1],) if sampled else (),
            completion_tokens=len(req.output_ids),
            finish_reason=None
            if handle._finish_error
            else (req.finish_reason.value if req.finish_reason else None),
            matched_stop=req.matched_stop,
            error=handle._finish_error,
            result=handle._finish_result,
            cached_len=req.cached_len,
            cached_l2=req.cached_l2,
            cached_l3=req.cached_l3,
        )

    def _on_engine_finish(self, req: Req) -> None:
        """engine.finish_hook: run the handle's on_finish while the request still holds its pages."""
        handle = self._handles.get(req.rid)
        if handle is None or handle.on_finish is None:
            return
        try:
            handle._finish_result = handle.on_finish(self.engine, req)
        except Exception as e:  # noqa: BLE001 - fails this request only
            log.exception("%s: on_finish of %s failed", self.name, req.rid)
            handle._finish_error = f"{type(e).__name__}: {e}"

    def _fail(self, req: Req, message: str) -> None:
        # Forget the KV computed so far (it may be half-written): nothing of it goes to the cache.
        req.cached_len = req.computed_len = 0
        try:
            self.engine.abort(req)
        except Exception:  # noqa: BLE001
            log.exception("%s: could not release %s after a failure", self.name, req.rid)
        handle = self._untrack(req.rid)
        if handle is not None:
            handle.events.put(ReqEvent(req.rid, completion_tokens=len(req.output_ids), error=message))

    def _fail_running(self, message: str) -> None:
        for req in list(self.engine.scheduler.running):
            self._fail(req, message)

    def _publish_stats(self) -> None:
        e = self.engine
        sched = e.scheduler
        staged = e.staged_reqs()  # waiting for an L3 lookup: queued as far as callers are concerned
        active = sched.running + sched.waiting + staged
        self.stats = LoopStats(
            running=len(sched.running),
            waiting=len(sched.waiting) + len(staged),
            free_tokens=e.free_tokens(),
            capacity_tokens=e.full_pool.num_pages * e.cfg.page_size,
            queued_tokens=sum(r.seq_len - r.computed_len for r in active if r.in_prefill),
            growth_tokens=sum(max(0, r.prompt_len + r.params.max_tokens - r.computed_len) for r in active),
            steps=self._steps,
            failed_steps=self._failed_steps,
            alive=not self._stopping,
        )

    def _shutdown(self) -> None:
        for req in list(self._reqs.values()):
            self._fail(req, "engine stopped")
        with self._lock:
            self._stopping = True
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None and item[1].set_running_or_notify_cancel():
                item[1].set_exception(EngineStopped(f"{self.name} stopped"))
        self._publish_stats()
