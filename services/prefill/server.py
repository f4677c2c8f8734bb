"""gRPC adapter of the prefill worker: PrefillWorker service (proto/worker.proto) over PrefillWorker."""

from __future__ import annotations

import threading

import grpc

from services.common.prompt_wire import parse_prompt
from services.common.sampling_wire import parse_sampling
from services.common.worker_errors import ErrorKind, WorkerError, abort_with
from services.prefill.worker import PrefillJob, PrefillWorker
from services.proto_gen import worker_pb2, worker_pb2_grpc


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker) -> None:
        self.worker = worker

    def Prefill(
        self, request: worker_pb2.PrefillRequest, context: grpc.ServicerContext
    ) -> worker_pb2.PrefillReply:
        done = threading.Event()

        def on_rpc_end() -> None:  # the router gave up (cancel, deadline): stop computing for nobody
            if not done.is_set():
                self.worker.abort(request.rid)

        context.add_callback(on_rpc_end)
        try:
            if not request.rid:
                raise WorkerError(ErrorKind.INVALID, "rid is required")
            job = PrefillJob(
                rid=request.rid,
                prompt_ids=parse_prompt(request),
                params=parse_sampling(request.sampling, request.rid),
                decode_addr=request.decode_addr,
                kv_transport=request.kv_transport,
            )
            result = self.worker.prefill(job)
        except WorkerError as e:
            done.set()
            abort_with(context, e)
        done.set()
        return worker_pb2.PrefillReply(
            rid=result.rid,
            first_token=result.first_token,
            first_logprob=result.first_logprob,
            cached_tokens=result.cached_tokens,
            cached_tokens_l2=result.cached_tokens_l2,
            cached_tokens_l3=result.cached_tokens_l3,
            finish_reason=result.finish_reason,
        )

    def Abort(self, request: worker_pb2.AbortRequest, context: grpc.ServicerContext) -> worker_pb2.AbortReply:
        return worker_pb2.AbortReply(found=self.worker.abort(request.rid))

    def Health(
        self, request: worker_pb2.HealthRequest, context: grpc.ServicerContext
    ) -> worker_pb2.HealthReply:
        s = self.worker.loop.stats
        return worker_pb2.HealthReply(
            role="prefill",
            model=self.worker.model,
            ready=self.worker.loop.alive,
            running=s.running,
            waiting=s.waiting,
            free_kv_tokens=s.free_tokens,
            queued_tokens=s.queued_tokens,
        )


def add_prefill_servicer(server: grpc.Server, worker: PrefillWorker) -> None:
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(worker), server)
