"""One sequence through the workers: Reserve on decode, Prefill on prefill, Decode stream.

    open():   Reserve(decode) --ok--> Prefill(prefill, decode addr) --first token--> Generation
    chunks(): first token, then Decode(decode) stream until a finish reason

Workers are chosen by the routing pipeline (routing.py): one decision per attempt, which gives the
prefill worker, the decode workers to ask in order, and the uncached-token estimate passed to the
prefill worker's uncached-first queue. The decode ranking needs no page hashes, so an attempt
ranks the decode workers first and sends Reserve, then hashes the prompt (first attempt only) and
picks the prefill worker while the Reserve is out:

    rank decode --Reserve(...)----------------------------------> ok --\
                 hash pages, index match, rank prefill  -----------------+--> Prefill

Failures before the first token are retried once (new rid, the failed workers avoided) only when
a worker could not be reached; every other failure is mapped to a RouterError. A worker that
answers UNAVAILABLE is reported to the pool as down if it then fails a Health probe too (a live
worker may answer UNAVAILABLE for a failed KV transfer).
Whatever ends a sequence early (client gone, router found a stop string, error) releases it on the
workers with Abort, sent in the background so that a cancelled task still gets it out. Inside
`hold_aborts()` (the HTTP layer, until a response has left) the Aborts wait: starting an RPC takes
the loop for a while, and a finished request's Abort would otherwise delay its own response.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncGenerator, Collection, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.prompt_wire import pack_ids
from services.common.sampling_params import SamplingParams
from services.common.sampling_wire import sampling_to_proto
from services.proto_gen import worker_pb2
from services.router.errors import (
    InvalidRequest,
    NoWorkerAvailable,
    RouterError,
    WorkerFailed,
    WorkerTimeout,
    WorkerUnavailable,
)
from services.router.job import FINISH_REASONS, TokenChunk
from services.router.metrics import RouterMetrics
from services.router.policy import Candidate
from services.router.routing import (
    CandidateSource,
    NoCandidate,
    Prompt,
    RoutingDecision,
    RoutingPipeline,
    prompt_key,
)
from services.router.settings import RouterSettings
from services.router.workers import Role, WorkerClients, WorkerPool

log = logging.getLogger("swaserve.router")


class HeldAborts:
    """Aborts asked for in one context (a request, and the tasks it starts) that wait for
    `release()`; released anyway after `max_hold_s`, so that no reservation is held for long."""

    def __init__(self, dispatcher: Dispatcher, max_hold_s: float) -> None:
        self._d = dispatcher
        self._held: list[tuple[str, str, str]] = []
        self._released = False
        self._timer = asyncio.get_running_loop().call_later(max_hold_s, self.release)

    def hold(self, role: str, addr: str, rid: str) -> bool:
        if self._released:
            return False
        self._held.append((role, addr, rid))
        return True

    def release(self) -> None:
        """Send what was held (idempotent); later Aborts of the context go out at once."""
        if self._released:
            return
        self._released = True
        self._timer.cancel()
        held, self._held = self._held, []
        for role, addr, rid in held:
            self._d.abort_later(role, addr, rid)


_HELD: contextvars.ContextVar[HeldAborts | None] = contextvars.ContextVar(
    "swaserve_held_aborts", default=None
)


class _Unreachable(Exception):
    def __init__(self, error: RouterError, addrs: tuple[str, ...]) -> None:
        self.error = error
        self.addrs = addrs  # the workers to avoid on the retry


@dataclass
class _PromptWire:
    """A prompt as the attempts of one request share it: packed and keyed once, hashed at most once."""

    ids: Sequence[int]
    packed: bytes  # prompt_wire.pack_ids
    key: bytes  # routing.prompt_key
    hashed: Prompt | None = None


class Dispatcher:
    def __init__(
        self,
        settings: RouterSettings,
        pool: WorkerPool,
        routing: RoutingPipeline,
        clients: WorkerClients,
        metrics: RouterMetrics | None = None,
        *,
        residency: Any = None,
    ) -> None:
        self.settings = settings
        self.residency = residency  # services/router/residency.RoutedResidency, or None
        self.pool = pool
        self.candidates = CandidateSource(pool)
        self.routing = routing
        self.clients = clients
        self.metrics = metrics
        self._background: set[asyncio.Future[Any]] = set()

    async def open(
        self, rid: str, prompt_ids: Sequence[int], sampling: SamplingParams, avoid: Collection[str] = ()
    ) -> Generation:
        """Reserve + Prefill; returns once the first token is known and the KV sits at decode.
        `avoid`: worker addresses that failed this request before (avoided while others remain)."""
        error: RouterError = NoWorkerAvailable("no worker available")
        packed = pack_ids(prompt_ids)  # the wire form, once (one copy of an array("I"))
        prompt = _PromptWire(prompt_ids, packed, prompt_key(packed))
        failed: set[str] = set(avoid)
        for attempt in range(self.settings.max_attempts):
            if attempt and self.metrics is not None:
                self.metrics.retries.inc()
            try:
                return await self._open_once(
                    rid if attempt == 0 else f"{rid}-r{attempt}", prompt, sampling, failed
                )
            except _Unreachable as e:
                error = e.error
                failed.update(e.addrs)
        raise error

    def route(
        self,
        prompt: Prompt,
        sampling: SamplingParams,
        failed: Collection[str] = (),
        decode_ranking: Sequence[Candidate] | None = None,
        spent_s: float = 0.0,
    ) -> RoutingDecision:
        """The routing decision for one attempt (timed and counted in the metrics; `spent_s`: time
        already spent on it, ranking the decode workers)."""
        t0 = time.perf_counter()
        try:
            decision = self.routing.decide(
                prompt,
                self._candidates("prefill"),
                self._candidates("decode") if decode_ranking is None else (),
                max_tokens=sampling.max_tokens,
                exclude=failed,
                decode_ranking=decode_ranking,
            )
        except NoCandidate as e:
            raise NoWorkerAvailable(f"no {e.role} worker is available") from None
        if self.metrics is not None:
            self.metrics.observe_decision(decision, time.perf_counter() - t0 + spent_s)
        return decision

    async def _open_once(
        self, rid: str, prompt: _PromptWire, sampling: SamplingParams, failed: Collection[str]
    ) -> Generation:
        t0 = time.perf_counter()
        self._candidates("prefill")  # discovery trouble is reported as before, prefill first
        n = len(prompt.ids)
        decodes = self.routing.rank_decode(
            n, prompt.key, self._candidates("decode"), max_tokens=sampling.max_tokens, exclude=failed
        )
        spent = time.perf_counter() - t0
        reserve = None
        routed: RoutingDecision | None = None
        if decodes:  # else route() raises the error: no decode (or no prefill) worker
            first = self._reserve_call(rid, decodes[0], n, sampling.max_tokens)
            reserve = asyncio.ensure_future(self._reserve(rid, decodes, n, sampling.max_tokens, first))
        try:
            # one loop turn: the call's task sends the Reserve (a task awaiting it would be one turn
            # late), then the hashing below holds the loop while the worker answers
            await asyncio.sleep(0)
            if prompt.hashed is None:
                prompt.hashed = self.routing.prepare(prompt.ids, prompt.key)
            decision = routed = self.route(prompt.hashed, sampling, failed, decodes, spent)
            if self.residency is not None and decision.reason not in ("index_unavailable", "no_index"):
                self.residency.record(rid, decision, prompt.hashed)  # siblings and replicas see it now
            if reserve is None:
                raise NoWorkerAvailable("no decode worker is available")  # unreachable: route() raised
            decode = await reserve
        except BaseException:
            self._release_reserve(reserve, rid)
            self._unroute(rid, routed)
            raise
        prefill = decision.prefill
        request = worker_pb2.PrefillRequest(
            rid=rid,
            prompt_ids_packed=prompt.packed,
            sampling=sampling_to_proto(sampling),
            decode_addr=decode.addr,
            kv_transport=self.settings.kv_transport,
        )
        try:
            reply = await self.clients.prefill(prefill.addr).Prefill(
                request, timeout=self.settings.prefill_timeout_s
            )
        except BaseException as e:
            self.abort_later("decode", decode.addr, rid)
            self._unroute(rid, decision)
            if isinstance(e, grpc.aio.AioRpcError):
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    # a dead prefill worker is marked down; a live one that answers UNAVAILABLE
                    # failed the KV transfer, so the retry avoids the decode worker as well
                    alive = await self.check_alive("prefill", prefill.addr)
                    avoid = (prefill.addr, decode.addr) if alive else (prefill.addr,)
                    raise _Unreachable(rpc_error(e, "prefill"), avoid) from None
                raise rpc_error(e, "prefill") from None
            self.abort_later("prefill", prefill.addr, rid)  # cancelled, or a bug: stop the work there
            raise
        if reply.finish_reason and reply.finish_reason not in FINISH_REASONS:  # "abort", or unknown
            self.abort_later("decode", decode.addr, rid)
            self._unroute(rid, decision)
            _check_finish(reply.finish_reason, "prefill")
        if self.metrics is not None:  # the attempt that answered: its prediction against the worker's count
            self.metrics.observe_prediction(decision, reply.cached_tokens)
        first = TokenChunk([reply.first_token], [reply.first_logprob], reply.finish_reason or None)
        return Generation(
            self,
            rid,
            decode.addr,
            prompt.packed,
            sampling,
            first,
            reply.cached_tokens,
            reply.cached_tokens_l2,
            reply.cached_tokens_l3,
        )

    def _unroute(self, rid: str, decision: RoutingDecision | None) -> None:
        """The attempt will not leave its prompt cached where it was routed: withdraw the pending entry."""
        if self.residency is not None and decision is not None:
            self.residency.drop(rid, decision.prefill.worker_id)

    def _release_reserve(self, reserve: asyncio.Future[Candidate] | None, rid: str) -> None:
        """The attempt failed before its Prefill: give back whatever its Reserve gets. The Reserve
        is let finish rather than cancelled, so that the Abort reaches the worker after it."""
        if reserve is None:
            return

        def release(done: asyncio.Future[Candidate]) -> None:
            if not done.cancelled() and done.exception() is None:  # (a cancelled _reserve aborted)
                self.abort_later("decode", done.result().addr, rid)

        self._background.add(reserve)
        reserve.add_done_callback(self._background.discard)
        reserve.add_done_callback(release)

    def _reserve_call(self, rid: str, w: Candidate, prompt_len: int, max_tokens: int) -> Any:
        """A Reserve RPC to `w`, under way from the next loop turn (a grpc.aio call to await)."""
        return self.clients.decode(w.addr).Reserve(
            worker_pb2.ReserveRequest(rid=rid, prompt_len=prompt_len, max_tokens=max_tokens),
            timeout=self.settings.reserve_timeout_s,
        )

    async def _reserve(
        self,
        rid: str,
        decodes: Sequence[Candidate],
        prompt_len: int,
        max_tokens: int,
        first: Any = None,
    ) -> Candidate:
        """Reserve on the first of `decodes` that accepts; `first`: the call already made to
        decodes[0]."""
        if not decodes:
            raise NoWorkerAvailable("no decode worker is available")
        refusals = []
        for i, w in enumerate(decodes):
            call = (
                first if i == 0 and first is not None else self._reserve_call(rid, w, prompt_len, max_tokens)
            )
            try:
                reply = await call
            except asyncio.CancelledError:
                self.abort_later("decode", w.addr, rid)  # it may have reserved already
                raise
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.UNAVAILABLE:
                    await self.check_alive("decode", w.addr)
                    refusals.append("unreachable")
                    continue
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    refusals.append("timed out")
                    continue
                raise rpc_error(e, "decode") from None
            if reply.ok:
                return w
            refusals.append(reply.reason or "refused")
        raise NoWorkerAvailable(f"no decode worker could take the request ({'; '.join(refusals)})")

    def _candidates(self, role: Role) -> list[Candidate]:
        try:
            return self.candidates(role)
        except Exception:  # discovery trouble (Redis down, ...) is an outage, not a client error
            log.exception("worker discovery failed")
            raise NoWorkerAvailable(f"{role} workers cannot be discovered right now") from None

    async def check_alive(self, role: str, addr: str) -> bool:
        """After an UNAVAILABLE (which a live worker may also answer): mark the worker down if it
        does not answer Health either. Returns whether it answered."""
        stub: Any = self.clients.decode(addr) if role == "decode" else self.clients.prefill(addr)
        try:
            await stub.Health(worker_pb2.HealthRequest(), timeout=self.settings.abort_timeout_s)
        except grpc.aio.AioRpcError:
            self.pool.mark_down(addr)
            if self.metrics is not None:
                self.metrics.marked_down.labels(role=role).inc()
            return False
        return True

    def check_alive_later(self, role: str, addr: str) -> None:
        async def probe() -> None:
            await self.check_alive(role, addr)

        self._spawn(probe())

    def hold_aborts(self, max_hold_s: float = 1.0) -> HeldAborts:
        """From now on in the caller's context (and the tasks it starts), `abort_later` waits for
        the returned handle's `release()` (or `max_hold_s`)."""
        held = HeldAborts(self, max_hold_s)
        _HELD.set(held)
        return held

    def abort_later(self, role: str, addr: str, rid: str) -> None:
        """Send Abort(rid) in the background (see hold_aborts); best effort (the worker may be gone)."""
        held = _HELD.get()
        if held is not None and held.hold(role, addr, rid):
            return
        stub: Any = self.clients.decode(addr) if role == "decode" else self.clients.prefill(addr)
        self._spawn(self._abort(stub, rid))

    async def _abort(self, stub: Any, rid: str) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await stub.Abort(worker_pb2.AbortRequest(rid=rid), timeout=self.settings.abort_timeout_s)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for the background Aborts (at shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.settings.abort_timeout_s + 1)


class Generation:
    """A sequence whose first token is known; `chunks()` yields it, then the Decode stream."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        rid: str,
        decode_addr: str,
        packed_prompt: bytes,
        sampling: SamplingParams,
        first: TokenChunk,
        cached_tokens: int,
        cached_tokens_l2: int = 0,
        cached_tokens_l3: int = 0,
    ) -> None:
        self._d = dispatcher
        self.rid = rid
        self.decode_addr = decode_addr
        self._packed_prompt = packed_prompt  # prompt_wire.pack_ids
        self._sampling = sampling
        self.first = first
        self.cached_tokens = cached_tokens
        self.cached_tokens_l2 = cached_tokens_l2  # of cached_tokens, from the worker's host tier
        self.cached_tokens_l3 = cached_tokens_l3  # of cached_tokens, from GCache through the host tier
        self._settled = False  # the workers know the sequence is over, and its load is released

    async def chunks(self) -> AsyncGenerator[TokenChunk, None]:
        """Ends after the chunk with a finish reason; closing it early aborts the sequence."""
        ended = False  # the workers know the sequence is over
        call = None
        try:
            yield self.first
            if self.first.finish_reason:
                return  # never decoded: the finally releases the reservation with Abort
            request = worker_pb2.DecodeRequest(
                rid=self.rid,
                sampling=sampling_to_proto(self._sampling),
                prompt_ids_packed=self._packed_prompt,
                first_token=self.first.token_ids[0],
            )
            call = self._d.clients.decode(self.decode_addr).Decode(
                request, timeout=self._d.settings.decode_timeout_s
            )
            async for msg in call:
                ended = bool(msg.finish_reason)
                _check_finish(msg.finish_reason, "decode")
                yield TokenChunk(
                    list(msg.token_ids),
                    list(msg.logprobs),
                    msg.finish_reason or None,
                    msg.matched_stop or None,
                )
                if ended:
                    return
            raise WorkerFailed("the decode worker ended the stream without a finish reason")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                self._d.check_alive_later("decode", self.decode_addr)
            raise rpc_error(e, "decode") from None
        finally:
            if call is not None and not call.done():
                call.cancel()
            self._settle(abort=not ended)

    def close(self) -> None:
        """Give the sequence up (never streamed, or abandoned): Abort on the decode worker."""
        self._settle(abort=True)

    def _settle(self, abort: bool) -> None:
        if self._settled:
            return
        self._settled = True
        if abort:
            self._d.abort_later("decode", self.decode_addr, self.rid)


def _check_finish(reason: str | None, role: str) -> None:
    if reason == "abort":
        raise WorkerFailed(f"the {role} worker aborted the request")
    if reason and reason not in FINISH_REASONS:
        raise WorkerFailed(f"the {role} worker reported an unknown finish reason")


def rpc_error(e: grpc.aio.AioRpcError, role: str) -> RouterError:
    """A worker's gRPC status as a RouterError; only INVALID_ARGUMENT details reach the client."""
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return WorkerUnavailable(f"the {role} worker is unavailable")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return WorkerUnavailable(f"the {role} worker is overloaded", code="overloaded")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return WorkerTimeout(f"the {role} worker did not answer in time")
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return InvalidRequest(e.details() or f"the {role} worker rejected the request")
    return WorkerFailed(f"the {role} worker failed")
