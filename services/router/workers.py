"""Where the workers are (a `WorkerPool`) and how the router talks to them (grpc.aio stubs).

A `WorkerPool` answers synchronously from what it already knows: the Redis-backed pool keeps a
snapshot that it refreshes in the background, so that picking a worker never waits on Redis.
`mark_down(addr)` is the router's report that a worker could not be reached; the pool leaves it
out until it proves alive again (static pool: for `down_seconds`; Redis pool: its next heartbeat).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

import grpc

from services.proto_gen import worker_pb2_grpc

Role = Literal["prefill", "decode"]

# Reconnect quickly: a worker that restarts should be usable again within about a second.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


@dataclass(frozen=True)
class WorkerInfo:
    addr: str  # gRPC "host:port"
    role: Role
    model: str = ""  # the model it serves, when the pool knows it


class WorkerPool(Protocol):
    def prefill_workers(self) -> list[WorkerInfo]: ...

    def decode_workers(self) -> list[WorkerInfo]: ...

    def mark_down(self, addr: str) -> None: ...


class StaticWorkerPool:
    """A fixed list of workers (tests, `--prefill/--decode` on the command line)."""

    def __init__(
        self, prefill_addrs: Iterable[str], decode_addrs: Iterable[str], down_seconds: float = 2.0
    ) -> None:
        self._prefill = [WorkerInfo(a, "prefill") for a in prefill_addrs]
        self._decode = [WorkerInfo(a, "decode") for a in decode_addrs]
        self._down_until: dict[str, float] = {}
        self._down_seconds = down_seconds

    def prefill_workers(self) -> list[WorkerInfo]:
        return self._alive(self._prefill)

    def decode_workers(self) -> list[WorkerInfo]:
        return self._alive(self._decode)

    def mark_down(self, addr: str) -> None:
        self._down_until[addr] = time.monotonic() + self._down_seconds

    def _alive(self, workers: list[WorkerInfo]) -> list[WorkerInfo]:
        now = time.monotonic()
        return [w for w in workers if self._down_until.get(w.addr, 0.0) <= now]


class WorkerClients:
    """One grpc.aio channel per worker address, opened on first use in the running event loop, and
    one stub per channel (a stub makes a callable per RPC of its service: not per request)."""

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._prefill: dict[str, worker_pb2_grpc.PrefillWorkerStub] = {}
        self._decode: dict[str, worker_pb2_grpc.DecodeWorkerStub] = {}

    def prefill(self, addr: str) -> worker_pb2_grpc.PrefillWorkerStub:
        stub = self._prefill.get(addr)
        if stub is None:
            stub = self._prefill[addr] = worker_pb2_grpc.PrefillWorkerStub(self._channel(addr))
        return stub

    def decode(self, addr: str) -> worker_pb2_grpc.DecodeWorkerStub:
        stub = self._decode.get(addr)
        if stub is None:
            stub = self._decode[addr] = worker_pb2_grpc.DecodeWorkerStub(self._channel(addr))
        return stub

    def _channel(self, addr: str) -> grpc.aio.Channel:
        channel = self._channels.get(addr)
        if channel is None:
            channel = grpc.aio.insecure_channel(addr, options=CHANNEL_OPTIONS)
            self._channels[addr] = channel
        return channel

    async def close(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        self._prefill.clear()
        self._decode.clear()
        for channel in channels:
            await channel.close(grace=None)
