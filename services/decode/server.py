"""gRPC adapter of the decode worker: DecodeWorker service (proto/worker.proto) over DecodeWorker."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services.common.prompt_wire import parse_prompt
from services.common.sampling_wire import parse_sampling
from services.common.worker_errors import ErrorKind, WorkerError, abort_with
from services.decode.worker import DecodeJob, DecodeWorker
from services.proto_gen import worker_pb2, worker_pb2_grpc


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker) -> None:
        self.worker = worker

    def Reserve(
        self, request: worker_pb2.ReserveRequest, context: grpc.ServicerContext
    ) -> worker_pb2.ReserveReply:
        try:
            res = self.worker.reserve(request.rid, request.prompt_len, request.max_tokens)
        except WorkerError as e:
            abort_with(context, e)
        return worker_pb2.ReserveReply(ok=res.ok, reason=res.reason)

    def Decode(
        self, request: worker_pb2.DecodeRequest, context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.DecodeChunk]:
        done = False

        def on_rpc_end() -> None:
            # a client cancel ends the RPC while this thread may be waiting for a token: abort the
            # request in the engine, which ends the stream below with finish "abort"
            if not done:
                self.worker.cancel(request.rid)

        context.add_callback(on_rpc_end)
        try:
            prompt_ids = parse_prompt(request)
            if not request.rid or not prompt_ids:
                raise WorkerError(ErrorKind.INVALID, "Decode needs a rid and the prompt ids")
            job = DecodeJob(
                rid=request.rid,
                prompt_ids=prompt_ids,
                first_token=request.first_token,
                params=parse_sampling(request.sampling, request.rid),
            )
            for out in self.worker.decode(job):
                if out.finish_reason:
                    done = True
                yield worker_pb2.DecodeChunk(
                    token_ids=out.token_ids,
                    logprobs=out.logprobs,
                    finish_reason=out.finish_reason,
                    matched_stop=out.matched_stop,
                    completion_tokens=out.completion_tokens,
                )
        except WorkerError as e:
            done = True
            abort_with(context, e)

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortReply:
        return worker_pb2.AbortReply(found=self.worker.abort(request.rid))

    def Health(
        self, request: worker_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> worker_pb2.HealthReply:
        load = self.worker.load()
        return worker_pb2.HealthReply(
            role="decode",
            model=self.worker.model,
            ready=self.worker.loop.alive,
            running=load["running"],
            waiting=load["waiting"],
            free_kv_tokens=load["free_kv_tokens"],
            queued_tokens=load["queued_tokens"],
        )


def add_decode_servicer(server: grpc.Server, worker: DecodeWorker) -> None:
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(worker), server)
