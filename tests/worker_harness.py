"""Prefill and decode workers on real in-process gRPC servers, for the worker tests.

Engines of one model share its weights (the forward is stateless), so a test pays one load per
model. KV moves over the real transport (services/common/kv_transport, "grpc" unless told).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from tokenizers import Tokenizer

from services.common.grpc_server import make_server
from services.common.kv_transport import add_kv_receiver
from services.common.prompt_wire import pack_ids
from services.common.sampling_wire import sampling_to_proto
from services.decode.metrics import DecodeMetrics
from services.decode.server import add_decode_servicer
from services.decode.worker import DecodeWorker
from services.engine.engine import Engine, EngineConfig
from services.engine.models.loader import load_model
from services.prefill.metrics import PrefillMetrics
from services.prefill.server import add_prefill_servicer
from services.prefill.worker import PrefillWorker
from services.proto_gen import worker_pb2, worker_pb2_grpc
from services.worker.engine_loop import EngineLoop


@dataclass
class LoadedModel:
    name: str
    model: Any
    tokenizer: Any

    @classmethod
    def load(cls, name: str, model_dir: Path) -> LoadedModel:
        tok = model_dir / "tokenizer.json"
        return cls(name, load_model(model_dir), Tokenizer.from_file(str(tok)) if tok.exists() else None)

    def engine(self, **cfg: Any) -> Engine:
        return Engine(self.model, self.model.config, EngineConfig(**cfg), self.tokenizer)


@dataclass
class Served:
    worker: Any
    loop: EngineLoop
    server: grpc.Server
    addr: str
    channel: grpc.Channel
    closers: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=None)
        for close in self.closers:
            close()
        self.loop.stop()


def serve_prefill(lm: LoadedModel, **kw: Any) -> Served:
    cfg = {"page_size": 16, "max_total_tokens": 8192, "queue_policy": "uncached-first"} | kw.pop("engine", {})
    loop = EngineLoop(lm.engine(**cfg), threads=2, name="prefill-engine").start()
    worker = PrefillWorker(loop, lm.name, metrics=PrefillMetrics(), **kw)
    server, port = make_server("127.0.0.1", 0)
    add_prefill_servicer(server, worker)
    server.start()
    addr = f"127.0.0.1:{port}"
    return Served(worker, loop, server, addr, grpc.insecure_channel(addr), [worker.close])


def serve_decode(lm: LoadedModel, **kw: Any) -> Served:
    cfg = {"page_size": 16, "max_total_tokens": 8192} | kw.pop("engine", {})
    loop = EngineLoop(lm.engine(**cfg), threads=2, name="decode-engine").start()
    worker = DecodeWorker(loop, lm.name, metrics=DecodeMetrics(), **kw).start()
    server, port = make_server("127.0.0.1", 0)
    add_decode_servicer(server, worker)
    receiver = add_kv_receiver(server, worker.on_payload)
    server.start()
    addr = f"127.0.0.1:{port}"
    return Served(worker, loop, server, addr, grpc.insecure_channel(addr), [worker.close, receiver.close])


def prefill_stub(s: Served) -> worker_pb2_grpc.PrefillWorkerStub:
    return worker_pb2_grpc.PrefillWorkerStub(s.channel)


def decode_stub(s: Served) -> worker_pb2_grpc.DecodeWorkerStub:
    return worker_pb2_grpc.DecodeWorkerStub(s.channel)


def shipped_kv_bytes(pre: Served, transport: str = "grpc") -> float:
    """Bytes of KV the prefill worker has shipped so far over `transport` (its metrics)."""
    value = pre.worker.metrics.registry.get_sample_value(
        "swaserve_prefill_kv_bytes_total", {"transport": transport}
    )
    return value or 0.0


def sampling(**kw: Any) -> worker_pb2.SamplingParams:
    return sampling_to_proto({"temperature": 0.0} | kw)


@dataclass
class Outcome:
    reply: worker_pb2.PrefillReply
    chunks: list[worker_pb2.DecodeChunk]
    kv_bytes: float  # the KV bytes the prefill worker shipped for this request (0: nothing landed)

    @property
    def tokens(self) -> list[int]:
        return [self.reply.first_token] + [t for c in self.chunks for t in c.token_ids]


def run_request(
    pre: Served, dec: Served, rid: str, prompt: list[int], transport: str = "grpc", **params: Any
) -> Outcome:
    """The router's three steps: Reserve at decode, Prefill (ships KV), Decode (stream)."""
    sp = sampling(**params)
    ok = decode_stub(dec).Reserve(
        worker_pb2.ReserveRequest(rid=rid, prompt_len=len(prompt), max_tokens=sp.max_tokens)
    )
    assert ok.ok, ok.reason
    shipped = shipped_kv_bytes(pre, transport)
    reply = prefill_stub(pre).Prefill(
        worker_pb2.PrefillRequest(
            rid=rid, prompt_ids_packed=pack_ids(prompt), sampling=sp, decode_addr=dec.addr,
            kv_transport=transport,
        ),
        timeout=60,
    )
    kv_bytes = shipped_kv_bytes(pre, transport) - shipped
    chunks: list[worker_pb2.DecodeChunk] = []
    if not reply.finish_reason:
        stream = decode_stub(dec).Decode(
            worker_pb2.DecodeRequest(
                rid=rid, sampling=sp, prompt_ids_packed=pack_ids(prompt), first_token=reply.first_token
            ),
            timeout=60,
        )
        chunks = list(stream)
    return Outcome(reply, chunks, kv_bytes)


def iter_tokens(chunks: Iterator[worker_pb2.DecodeChunk]) -> Iterator[int]:
    for c in chunks:
        yield from c.token_ids
