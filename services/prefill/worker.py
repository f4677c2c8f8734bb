"""The prefill worker's core, transport-free: prompt in, first token out, KV shipped to decode.

    prefill(job):  engine (max_tokens=1, the client's other sampling params)
                   -> first token sampled; in finish_hook (pages still held) export the KV
                   -> ship it to job.decode_addr with the sender of job.kv_transport
                   -> PrefillResult (first token, cached tokens, KV bytes, timings)

When the first token already ends the request (eos, stop token, stop string, max_tokens == 1, the
model's context), no KV is shipped: the result carries the finish reason and the router does not
call Decode.

An abort that arrives while the KV is on its way (the router cancelled, or died and its RPC
dropped) cannot stop the bytes, so once they landed the worker tells the decode worker to drop
them (DecodeWorker.Abort, in the background): the decode worker frees them at once instead of
holding them until its --pending-ttl.

The engine runs in an EngineLoop thread; this class is called from the gRPC handler threads and
does the (blocking) KV transfer on the caller's thread, so the engine keeps stepping meanwhile.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from services.common.kv_payload import KVPayload
from services.common.sampling_params import SamplingParams
from services.common.worker_errors import ErrorKind, WorkerError
from services.engine.engine import Engine
from services.engine.request import FinishReason, Req
from services.prefill.metrics import PrefillMetrics
from services.prefill.result import PrefillResult
from services.worker.engine_loop import EngineLoop, EngineStopped

log = logging.getLogger(__name__)


class KVSender(Protocol):
    def send(self, decode_addr: str, payload: KVPayload) -> Any: ...  # -> TransferResult(nbytes, seconds)


SenderFactory = Callable[[str], KVSender]
DecodeRelease = Callable[[str, str], None]  # (decode_addr, rid): drop KV that landed for nobody


def abort_at_decode(decode_addr: str, rid: str) -> None:
    """DecodeWorker.Abort(rid) at decode_addr; best effort (the decode's TTL is the backstop)."""
    import grpc

    from services.common.grpc_auth import internal_channel
    from services.proto_gen import worker_pb2, worker_pb2_grpc

    try:
        with internal_channel(decode_addr) as channel:
            reply = worker_pb2_grpc.DecodeWorkerStub(channel).Abort(
                worker_pb2.AbortRequest(rid=rid), timeout=5.0
            )
        log.info("prefill %s: aborted after its KV landed; decode %s dropped it: %s", rid, decode_addr,
                 reply.found)  # fmt: skip
    except grpc.RpcError as e:
        log.warning("prefill %s: could not tell decode %s to drop its KV: %s", rid, decode_addr, e.code())


def default_sender_factory(transport: str) -> KVSender:
    from services.common.kv_transport import make_sender

    return make_sender(transport)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class PrefillJob:
    rid: str
    prompt_ids: Sequence[int]
    params: SamplingParams  # the client's, max_tokens included
    decode_addr: str
    kv_transport: str = ""  # "" -> the worker's default


@dataclass(frozen=True)
class _Exported:
    """What on_finish hands from the loop thread to the handler thread."""

    payload: KVPayload | None
    finish_reason: str
    matched_stop: str | int | None


def first_token_finish(engine: Engine, req: Req, client: SamplingParams) -> str:
    """Does req's one sampled token end the *client's* request? ("" if not)

    The engine ran with max_tokens=1, so it reports "length" for every token that is not a stop.
    """
    if req.finish_reason is FinishReason.STOP:
        return "stop"
    if client.max_tokens <= 1 or req.seq_len >= engine.max_context:
        return "length"
    return ""


class PrefillWorker:
    def __init__(
        self,
        loop: EngineLoop,
        model: str,
        default_transport: str = "grpc",
        sender_factory: SenderFactory = default_sender_factory,
        metrics: PrefillMetrics | None = None,
        timeout: float = 600.0,
        release_at_decode: DecodeRelease = abort_at_decode,
    ) -> None:
        self.loop = loop
        self.release_at_decode = release_at_decode
        self.model = model
        self.default_transport = default_transport
        self.sender_factory = sender_factory
        self.metrics = metrics or PrefillMetrics()
        self.metrics.bind_loop(loop)
        self.timeout = timeout
        self._senders: dict[str, KVSender] = {}
        self._lock = threading.Lock()
        # rid -> aborted, from submit to reply: an abort that races with the request's last engine step
        # (the engine already finished it, loop.abort finds nothing) must still stop the KV shipping
        self._active: dict[str, bool] = {}

    # -- the RPCs --------------------------------------------------------------------------------
    def prefill(self, job: PrefillJob) -> PrefillResult:
        received = time.monotonic()
        if not job.decode_addr:
            raise WorkerError(ErrorKind.INVALID, f"{job.rid}: decode_addr is required")
        transport = job.kv_transport or self.default_transport
        sender = self._sender(transport)  # before computing: an unknown transport costs nothing
        with self._lock:
            self._active[job.rid] = False
        try:
            return self._prefill(job, sender, transport, received)
        finally:
            with self._lock:
                self._active.pop(job.rid, None)

    def _prefill(self, job: PrefillJob, sender: KVSender, transport: str, received: float) -> PrefillResult:
        handle = self._submit(job)
        try:
            final = handle.wait_finished(self.timeout)
        except queue.Empty:
            self.loop.abort(job.rid)
            self.metrics.requests.labels("timeout").inc()
            raise WorkerError(
                ErrorKind.DEADLINE, f"{job.rid}: prefill not done within {self.timeout}s"
            ) from None
        if final.error is not None:
            self.metrics.requests.labels("error").inc()
            raise WorkerError(ErrorKind.INTERNAL, f"{job.rid}: {final.error}")
        if final.finish_reason == FinishReason.ABORT.value:
            self.metrics.requests.labels("aborted").inc()
            raise WorkerError(ErrorKind.ABORTED, f"{job.rid}: aborted")
        with self._lock:
            aborted = self._active.get(job.rid, False)
        if aborted:  # the abort came while the engine ran the request's last step: ship nothing
            self.metrics.requests.labels("aborted").inc()
            raise WorkerError(ErrorKind.ABORTED, f"{job.rid}: aborted")
        exported: _Exported = final.result
        admitted = handle.admitted_at or handle.submitted_at
        kv_bytes, transfer_s = 0, 0.0
        if exported.payload is not None:
            kv_bytes, transfer_s = self._ship(job.rid, sender, transport, job.decode_addr, exported.payload)
        result = PrefillResult(
            rid=job.rid,
            first_token=final.token_ids[0],
            first_logprob=final.logprobs[0],
            cached_tokens=final.cached_len,
            cached_tokens_l2=final.cached_l2,
            cached_tokens_l3=final.cached_l3,
            kv_bytes=kv_bytes,
            finish_reason=exported.finish_reason,
            matched_stop=exported.matched_stop,
            queue_seconds=admitted - handle.submitted_at,
            prefill_seconds=final.at - admitted,
            transfer_seconds=transfer_s,
        )
        self.metrics.observe(result, prompt_len=len(job.prompt_ids), ttft=final.at - received)
        log.info(
            "prefill %s: %d prompt tokens (%d cached), first token %d%s, KV %d bytes in %.3fs via %s to %s",
            job.rid, len(job.prompt_ids), result.cached_tokens, result.first_token,
            f" ({result.finish_reason})" if result.finish_reason else "", kv_bytes, transfer_s,
            transport, job.decode_addr,
        )  # fmt: skip
        return result

    def abort(self, rid: str) -> bool:
        with self._lock:
            known = rid in self._active
            if known:
                self._active[rid] = True  # a transfer under way finishes; the reply says aborted
        try:
            found = self.loop.abort(rid)
        except EngineStopped:
            found = False
        return found or known

    # -- helpers ---------------------------------------------------------------------------------
    def _submit(self, job: PrefillJob) -> Any:
        client = job.params
        params = replace(client, max_tokens=1)

        def on_finish(engine: Engine, req: Req) -> _Exported:
            reason = first_token_finish(engine, req, client)
            stop = req.matched_stop if reason == "stop" else None
            return _Exported(None if reason else engine.export_kv(req), reason, stop)

        try:
            return self.loop.add_request(job.prompt_ids, params, rid=job.rid, on_finish=on_finish)
        except ValueError as e:
            self.metrics.requests.labels("invalid").inc()
            raise WorkerError(ErrorKind.INVALID, f"{job.rid}: {e}") from None
        except EngineStopped as e:
            raise WorkerError(ErrorKind.UNAVAILABLE, str(e)) from None
        except TimeoutError:
            raise WorkerError(
                ErrorKind.UNAVAILABLE, f"{job.rid}: the engine did not take it in time"
            ) from None

    def _sender(self, transport: str) -> KVSender:
        with self._lock:
            sender = self._senders.get(transport)
            if sender is None:
                try:
                    sender = self.sender_factory(transport)
                except (ValueError, KeyError) as e:
                    raise WorkerError(ErrorKind.INVALID, f"unknown kv_transport {transport!r}: {e}") from None
                self._senders[transport] = sender
            return sender

    def _ship(
        self, rid: str, sender: KVSender, transport: str, addr: str, payload: KVPayload
    ) -> tuple[int, float]:
        started = time.monotonic()
        try:
            res = sender.send(addr, payload)
        except Exception as e:  # noqa: BLE001 - any transfer failure is the same to the router
            self.metrics.requests.labels("kv_transfer_failed").inc()
            raise WorkerError(
                ErrorKind.UNAVAILABLE, f"{rid}: KV transfer to {addr} via {transport} failed: {e}"
            ) from None
        finally:
            with self._lock:
                aborted = self._active.get(rid, False)
        seconds = float(getattr(res, "seconds", time.monotonic() - started))
        nbytes = int(getattr(res, "nbytes", getattr(res, "bytes", payload.nbytes)))
        self.metrics.observe_transfer(transport, nbytes, seconds)
        if aborted:
            self.metrics.requests.labels("aborted").inc()
            threading.Thread(
                target=self.release_at_decode, args=(addr, rid), name=f"release-{rid}", daemon=True
            ).start()
            raise WorkerError(ErrorKind.ABORTED, f"{rid}: aborted during the KV transfer")
        return nbytes, seconds

    def close(self) -> None:
        for sender in self._senders.values():
            close = getattr(sender, "close", None)
            if callable(close):
                close()
