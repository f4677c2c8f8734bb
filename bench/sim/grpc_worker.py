"""The simulated prefill and decode workers' gRPC services (proto/worker.proto), on grpc.aio.

Same RPCs and replies as services/prefill/server.py and services/decode/server.py, so the router
cannot tell them apart, except that nothing crosses the network but the replies:

    Prefill  the SimEngine computes the prompt (real scheduler and radix cache, simulated time),
             then the KV transfer to decode_addr is modelled as time (window-aware bytes over
             the cost model's link)
    Reserve  SimDecoder's admission (KV tokens, as the real decode worker)
    Decode   tokens paced by the cost model; the simulated decode worker never waits for KV
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import NoReturn

import grpc

from bench.sim.decode import SimDecoder
from bench.sim.engine import PrefillAborted, PrefillFailed, SimEngine
from bench.sim.stats import SimStats
from services.common.prompt_wire import parse_prompt
from services.common.worker_errors import ErrorKind, WorkerError
from services.proto_gen import worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)


async def _abort(context: grpc.aio.ServicerContext, err: WorkerError) -> NoReturn:  # type: ignore[type-arg]
    await context.abort(err.kind.value, err.message)
    raise AssertionError("unreachable: context.abort raises")


class SimPrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, engine: SimEngine, model: str, stats: SimStats) -> None:
        self.engine = engine
        self.model = model
        self.stats = stats
        self._shipping: dict[str, bool] = {}  # rid -> aborted, while its KV transfer is modelled

    async def Prefill(  # type: ignore[override]
        self,
        request: worker_pb2.PrefillRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.PrefillReply:
        try:
            reply = await self._prefill(request)
        except WorkerError as e:
            await _abort(context, e)
        self.stats.served()
        return reply

    async def _prefill(self, request: worker_pb2.PrefillRequest) -> worker_pb2.PrefillReply:
        rid, max_tokens = request.rid, request.sampling.max_tokens
        if not rid or not request.decode_addr:
            raise WorkerError(ErrorKind.INVALID, f"{rid!r}: a rid and a decode_addr are required")
        if max_tokens < 1:
            raise WorkerError(ErrorKind.INVALID, f"{rid}: max_tokens must be >= 1")
        try:
            future = self.engine.submit(rid, parse_prompt(request))
        except ValueError as e:
            raise WorkerError(ErrorKind.INVALID, f"{rid}: {e}") from None
        try:
            out = await future
        except asyncio.CancelledError:  # the router gave up on the RPC: stop computing for nobody
            self.engine.abort(rid)
            raise
        except PrefillAborted:
            raise WorkerError(ErrorKind.ABORTED, f"{rid}: aborted") from None
        except PrefillFailed as e:
            raise WorkerError(ErrorKind.INTERNAL, str(e)) from None
        finish = "length" if max_tokens <= 1 else ""  # no EOS in a simulation
        if not finish:
            cost = self.engine.cost
            self._shipping[rid] = False
            try:
                await asyncio.sleep(cost.real_seconds(cost.kv_transfer_seconds(out.prompt_len)))
            finally:
                aborted = self._shipping.pop(rid, False)
            if aborted:
                raise WorkerError(ErrorKind.ABORTED, f"{rid}: aborted during the KV transfer")
        return worker_pb2.PrefillReply(
            rid=rid,
            first_token=out.first_token,
            first_logprob=0.0,
            cached_tokens=out.cached_tokens,
            finish_reason=finish,
        )

    async def Abort(  # type: ignore[override]
        self,
        request: worker_pb2.AbortRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.AbortReply:
        found = self.engine.abort(request.rid)
        if request.rid in self._shipping:
            self._shipping[request.rid] = True
            found = True
        return worker_pb2.AbortReply(found=found)

    async def Health(  # type: ignore[override]
        self,
        request: worker_pb2.HealthRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.HealthReply:
        s = self.engine.load
        return worker_pb2.HealthReply(
            role="prefill", model=self.model, ready=True, running=s.running, waiting=s.waiting,
            free_kv_tokens=s.free_tokens, queued_tokens=s.queued_tokens,
        )  # fmt: skip


class SimDecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, decoder: SimDecoder, model: str, stats: SimStats) -> None:
        self.decoder = decoder
        self.model = model
        self.stats = stats

    async def Reserve(  # type: ignore[override]
        self,
        request: worker_pb2.ReserveRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.ReserveReply:
        try:
            ok, reason = self.decoder.reserve(request.rid, request.prompt_len, request.max_tokens)
        except WorkerError as e:
            await _abort(context, e)
        return worker_pb2.ReserveReply(ok=ok, reason=reason)

    async def Decode(  # type: ignore[override]
        self,
        request: worker_pb2.DecodeRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[worker_pb2.DecodeChunk]:
        try:
            prompt = parse_prompt(request)
        except WorkerError as e:
            await _abort(context, e)
        stream = self.decoder.decode(request.rid, prompt, request.sampling.max_tokens)
        try:
            async for chunk in stream:
                yield worker_pb2.DecodeChunk(
                    token_ids=chunk.token_ids,
                    logprobs=[0.0] * len(chunk.token_ids),
                    finish_reason=chunk.finish_reason,
                    completion_tokens=chunk.completion_tokens,
                )
        except WorkerError as e:
            await _abort(context, e)
        finally:
            await stream.aclose()  # a cancelled RPC releases the request's KV at once
        self.stats.served()

    async def Abort(  # type: ignore[override]
        self,
        request: worker_pb2.AbortRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.AbortReply:
        return worker_pb2.AbortReply(found=self.decoder.abort(request.rid))

    async def Health(  # type: ignore[override]
        self,
        request: worker_pb2.HealthRequest,
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> worker_pb2.HealthReply:
        load = self.decoder.load()
        return worker_pb2.HealthReply(
            role="decode", model=self.model, ready=True, running=load["running"], waiting=load["waiting"],
            free_kv_tokens=load["free_kv_tokens"], queued_tokens=load["queued_tokens"],
        )  # fmt: skip


async def start_grpc_server(
    host: str, port: int, servicer: SimPrefillServicer | SimDecodeServicer
) -> tuple[grpc.aio.Server, int]:
    """An aio server with the role's service, started; returns it and the bound port."""
    from services.common.grpc_server import SERVER_OPTIONS

    server = grpc.aio.server(options=SERVER_OPTIONS)
    if isinstance(servicer, SimPrefillServicer):
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    else:
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind a gRPC server to {host}:{port}")
    await server.start()
    return server, bound
