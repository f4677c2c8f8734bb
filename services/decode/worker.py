"""The decode worker's core, transport-free: reservations, KV arriving early, decoding.

The three calls of one request (proto/worker.proto) and what each leaves here:

    Reserve(rid, prompt_len, max_tokens)  a Reservation of prompt_len + max_tokens KV tokens,
                                          expiring after reserve_ttl
    KV lands (on_payload, from the        the KVPayload waits here, in host memory, keyed by rid
    transport's receiver)                 (Pending, expiring after pending_ttl); the reservation
                                          still counts its tokens
    Decode(rid, prompt, first token, ..)  the payload goes into the engine (add_prefilled) and the
                                          reservation ends; tokens stream until the finish

Why pending payloads and not an install at arrival: add_prefilled needs the prompt ids, the first
token and the sampling params, and those arrive with Decode (the KV header carries only the
geometry). Holding the payload in host memory for the moment between the two calls costs a copy's
worth of RAM, bounded by the reservations; the alternative (carrying prompt and params in the KV
header) would put request semantics into the transport. Decode waits up to kv_wait for a payload
that is still on the wire, so a router may also send Decode right after Prefill without waiting.

Admission arithmetic (all in KV tokens of the full pool):

    available = free (free + evictable pages) - growth (what running requests may still claim)
                - sum(live reservations)
    Reserve ok  <=>  prompt_len + max_tokens <= available
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.kv_payload import KVPayload
from services.common.sampling_params import SamplingParams
from services.common.worker_errors import ErrorKind, WorkerError
from services.decode.metrics import DecodeMetrics
from services.engine.kv.page_pool import OutOfPages
from services.engine.request import Req
from services.engine.sampling import Sampled
from services.engine.stop_check import check_finish
from services.engine.tensors.kv_transfer import payload_meta
from services.worker.engine_loop import EngineLoop, EngineStopped, RequestHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReserveResult:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class DecodeJob:
    rid: str
    prompt_ids: Sequence[int]
    first_token: int
    params: SamplingParams


@dataclass(frozen=True)
class DecodeOutput:
    """One chunk of the stream; finish_reason is set on the last."""

    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    completion_tokens: int  # the first token (from the prefill worker) included
    finish_reason: str = ""
    matched_stop: str = ""


@dataclass
class _Reservation:
    tokens: int
    expires: float


@dataclass
class _Pending:
    payload: KVPayload
    expires: float


class DecodeWorker:
    def __init__(
        self,
        loop: EngineLoop,
        model: str,
        reserve_ttl: float = 30.0,
        pending_ttl: float = 60.0,
        kv_wait: float = 30.0,
        metrics: DecodeMetrics | None = None,
    ) -> None:
        self.loop = loop
        self.engine = loop.engine  # read-only use from handler threads: constants, tokenizer, geometry
        self.model = model
        self.reserve_ttl, self.pending_ttl, self.kv_wait = reserve_ttl, pending_ttl, kv_wait
        self.metrics = metrics or DecodeMetrics()
        self.metrics.bind(self)
        self._cond = threading.Condition()
        self._reservations: dict[str, _Reservation] = {}
        self._pending: dict[str, _Pending] = {}
        self._cancelled: dict[str, float] = {}  # rid -> expiry: aborted before its Decode ran
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(self) -> DecodeWorker:
        self._sweeper = threading.Thread(target=self._sweep_forever, name="decode-sweeper", daemon=True)
        self._sweeper.start()
        return self

    def close(self) -> None:
        self._stop.set()

    # -- reservations --------------------------------------------------------------------------
    def reserved_tokens(self) -> int:
        with self._cond:
            return sum(r.tokens for r in self._reservations.values())

    def pending_count(self) -> int:
        with self._cond:
            return len(self._pending)

    def available_tokens(self) -> int:
        s = self.loop.stats
        return s.free_tokens - s.growth_tokens - self.reserved_tokens()

    def reserve(self, rid: str, prompt_len: int, max_tokens: int) -> ReserveResult:
        if not rid or prompt_len < 1 or max_tokens < 1:
            raise WorkerError(
                ErrorKind.INVALID, f"{rid!r}: Reserve needs a rid, prompt_len >= 1, max_tokens >= 1"
            )
        need = prompt_len + max_tokens
        capacity = self.loop.stats.capacity_tokens
        if not self.loop.alive:
            return self._refuse("engine not running")
        if need > capacity:
            return self._refuse(f"{rid} needs {need} KV tokens; this worker holds {capacity} in all")
        with self._cond:
            self._sweep_locked(time.monotonic())
            old = self._reservations.pop(rid, None)
            available = self.available_tokens()
            if need > available:
                if old is not None:
                    self._reservations[rid] = old
                return self._refuse(f"{rid} needs {need} KV tokens; {max(0, available)} available now")
            self._reservations[rid] = _Reservation(need, time.monotonic() + self.reserve_ttl)
        self.metrics.reservations.labels("ok").inc()
        return ReserveResult(True)

    def _refuse(self, reason: str) -> ReserveResult:
        self.metrics.reservations.labels("refused").inc()
        return ReserveResult(False, reason)

    # -- KV arrival (the transport's receiver calls this; raising refuses the transfer) ---------
    def on_payload(self, payload: KVPayload) -> None:
        rid = payload.meta.rid
        expected = payload_meta(self.engine.store, rid, payload.meta.num_tokens, self.engine.window)
        if payload.meta.layers != expected.layers or payload.meta.window != expected.window:
            raise ValueError(f"KV for {rid} has another model's geometry or window than {self.model}")
        with self._cond:
            now = time.monotonic()
            self._sweep_locked(now)
            if rid in self._cancelled:
                raise WorkerError(ErrorKind.ABORTED, f"{rid} was aborted")
            res = self._reservations.get(rid)
            if res is None:
                # no Reserve first: take it only if it fits now, and hold the room until Decode
                need = payload.meta.num_tokens + 1
                if need > self.available_tokens():
                    raise OutOfPages(f"no reservation for {rid} and no room for {need} KV tokens")
                res = self._reservations[rid] = _Reservation(need, now)
            res.expires = now + self.pending_ttl
            self._pending[rid] = _Pending(payload, now + self.pending_ttl)
            self._cond.notify_all()
        self.metrics.kv_bytes.inc(payload.nbytes)
        log.info(
            "decode: KV for %s landed (%d tokens, %d bytes)", rid, payload.meta.num_tokens, payload.nbytes
        )

    def _take_payload(self, rid: str) -> KVPayload:
        deadline = time.monotonic() + self.kv_wait
        with self._cond:
            while True:
                pending = self._pending.pop(rid, None)
                if pending is not None:
                    return pending.payload
                if self._cancelled.pop(rid, None) is not None:
                    self.metrics.requests.labels("aborted").inc()
                    raise WorkerError(ErrorKind.ABORTED, f"{rid}: aborted")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.metrics.requests.labels("no_kv").inc()
                    raise WorkerError(
                        ErrorKind.NOT_FOUND,
                        f"{rid}: no KV arrived within {self.kv_wait}s (was it prefilled for here?)",
                    )
                self._cond.wait(min(left, 0.5))

    def _release(self, rid: str) -> None:
        with self._cond:
            self._reservations.pop(rid, None)
            self._pending.pop(rid, None)

    # -- decode ----------------------------------------------------------------------------------
    def first_token_ends(self, job: DecodeJob) -> Req | None:
        """The request as it stands after the first token, if that token already ends it."""
        req = Req(rid=job.rid, prompt_ids=list(job.prompt_ids), params=job.params)
        req.output_ids.append(job.first_token)
        decode = self.engine.decode_ids if self.engine.tokenizer is not None else None
        check_finish(req, self.engine.eos_ids, self.engine.max_context, decode)
        return req if req.finished else None

    def decode(self, job: DecodeJob) -> Iterator[DecodeOutput]:
        """The tokens after the first one. Closing the iterator early aborts the request."""
        received = time.monotonic()
        ended = self.first_token_ends(job)
        if ended is not None:  # the prefill worker shipped no KV for it
            self._release(job.rid)
            self.metrics.requests.labels("ok").inc()
            stop = ended.matched_stop if isinstance(ended.matched_stop, str) else ""
            reason = ended.finish_reason.value if ended.finish_reason else "stop"
            yield DecodeOutput((), (), 1, reason, stop)
            return
        handle = self._install(job)
        self.metrics.queue_seconds.observe(time.monotonic() - received)
        yield from self._stream(job.rid, handle)

    def _install(self, job: DecodeJob) -> RequestHandle:
        try:
            payload = self._take_payload(job.rid)
        except WorkerError:
            self._release(job.rid)
            raise
        try:
            handle = self.loop.add_prefilled(
                job.prompt_ids, Sampled(job.first_token, 0.0), payload, job.params
            )
        except OutOfPages as e:
            self.metrics.requests.labels("no_room").inc()
            raise WorkerError(ErrorKind.EXHAUSTED, f"{job.rid}: no room for its KV: {e}") from None
        except ValueError as e:
            self.metrics.requests.labels("invalid").inc()
            raise WorkerError(ErrorKind.INVALID, f"{job.rid}: {e}") from None
        except EngineStopped as e:
            raise WorkerError(ErrorKind.UNAVAILABLE, str(e)) from None
        except TimeoutError:
            raise WorkerError(
                ErrorKind.UNAVAILABLE, f"{job.rid}: the engine did not take it in time"
            ) from None
        finally:
            self._release(job.rid)  # the engine owns its KV now (or nobody does)
        with self._cond:
            cancelled = self._cancelled.pop(job.rid, None) is not None
        if cancelled:  # aborted while its KV was being installed
            self.loop.abort(job.rid)
        return handle

    def _stream(self, rid: str, handle: RequestHandle) -> Iterator[DecodeOutput]:
        finished = False
        last = time.monotonic()
        try:
            while True:
                try:
                    events = handle.next_events(timeout=1.0)
                except queue.Empty:
                    continue
                toks = tuple(t for ev in events for t in ev.token_ids)
                lps = tuple(lp for ev in events for lp in ev.logprobs)
                end = events[-1]
                if toks:
                    now = time.monotonic()
                    self.metrics.observe_tokens(len(toks), now - last)
                    last = now
                if end.error is not None:
                    finished = True
                    self.metrics.requests.labels("error").inc()
                    raise WorkerError(ErrorKind.INTERNAL, f"{rid}: {end.error}")
                finished = end.finished
                stop = end.matched_stop if isinstance(end.matched_stop, str) else ""
                yield DecodeOutput(toks, lps, end.completion_tokens, end.finish_reason or "", stop)
                if finished:
                    self.metrics.requests.labels("aborted" if end.finish_reason == "abort" else "ok").inc()
                    return
        finally:
            if not finished:  # the consumer closed the stream early: stop decoding for nobody
                self.abort(rid)

    def cancel(self, rid: str) -> bool:
        """The client went away (its Decode RPC ended early): abort, counted as cancelled."""
        self.metrics.requests.labels("cancelled").inc()
        return self.abort(rid)

    def abort(self, rid: str) -> bool:
        """Abort wherever the request is: reserved, KV pending, waiting in Decode for its KV, decoding."""
        try:
            if self.loop.abort(rid):
                return True
        except EngineStopped:
            pass
        with self._cond:
            had = self._reservations.pop(rid, None) is not None
            had = self._pending.pop(rid, None) is not None or had
            self._cancelled[rid] = time.monotonic() + self.pending_ttl
            self._cond.notify_all()
        return had

    # -- expiry ----------------------------------------------------------------------------------
    def _sweep_locked(self, now: float) -> None:
        for rid in [r for r, exp in self._cancelled.items() if exp <= now]:
            del self._cancelled[rid]
        for rid in [r for r, p in self._pending.items() if p.expires <= now]:
            del self._pending[rid]
            self.metrics.expired.labels("kv").inc()
            log.warning("decode: KV for %s expired: no Decode within %.0fs", rid, self.pending_ttl)
        for rid in [
            r for r, res in self._reservations.items() if res.expires <= now and r not in self._pending
        ]:
            del self._reservations[rid]
            self.metrics.expired.labels("reservation").inc()

    def sweep(self) -> None:
        with self._cond:
            self._sweep_locked(time.monotonic())

    def _sweep_forever(self) -> None:
        while not self._stop.wait(1.0):
            self.sweep()

    def load(self) -> dict[str, Any]:
        s = self.loop.stats
        return {
            "running": s.running,
            "waiting": s.waiting,
            "free_kv_tokens": max(0, self.available_tokens()),
            "queued_tokens": s.queued_tokens,
        }
