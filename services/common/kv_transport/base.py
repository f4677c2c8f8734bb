"""The KV transport interface: a sender per transport, a receiver per transport, one gRPC service.

    prefill worker                                    decode worker
    make_sender(name).send(addr, payload) ----Push(header, ...)---> KVReceiverService
                                          <---KVAck(ok | error)---   receivers[header.transport]
                                                                        .receive(...) -> KVPayload
                                                                     on_payload(payload)

The Push stream is every transport's control channel: it carries the header (and, for "grpc",
the data). A transport registers a KVSender and a KVReceiver under one name; the decode worker's
service dispatches on `header.transport`. Every failure a sender sees -- unreachable worker,
refusal, timeout, broken stream -- surfaces as KVTransferError with the reason.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from services.common.grpc_auth import internal_channel
from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_wire import KVWireError, decode_chunk, meta_from_header
from services.proto_gen import kv_pb2

log = logging.getLogger(__name__)

PUSH_METHOD = "/swaserve.kv.KVTransfer/Push"
MAX_MESSAGE_BYTES = 64 << 20  # gRPC's default 4 MiB limit rejects a 4 MiB chunk (FACTS.md)
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class KVTransferError(RuntimeError):
    """A transfer did not land; the message says why. The receiver holds nothing of it."""


@dataclass(frozen=True)
class TransferResult:
    nbytes: int  # payload bytes moved (KVMeta.nbytes)
    seconds: float  # send() call to ack

    @property
    def gbps(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


OnPayload = Callable[[KVPayload], None]


# ---- sending -----------------------------------------------------------------------------------


class KVSender(ABC):
    """Ships payloads to decode workers; one per process and transport, thread-safe, reusable.

    Keeps one channel per decode address. A new address must answer within `connect_timeout`
    (a refused connection fails at once); a whole transfer must finish within `timeout`."""

    name: ClassVar[str]

    def __init__(self, timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()

    def send(self, decode_addr: str, payload: KVPayload) -> TransferResult:
        t0 = time.perf_counter()
        try:
            ack = self._send(decode_addr, payload)
        except KVTransferError:
            raise
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
            raise KVTransferError(
                f"{self.name} transfer of {payload.meta.rid!r} to {decode_addr} failed: {code.name}: {details}"
            ) from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise KVTransferError(
                f"{self.name} transfer of {payload.meta.rid!r} to {decode_addr} failed: {exc}"
            ) from exc
        if not ack.ok:
            raise KVTransferError(f"decode worker {decode_addr} refused KV of {payload.meta.rid!r}: {ack.error}")
        if ack.bytes_received != payload.nbytes:
            raise KVTransferError(
                f"decode worker {decode_addr} acknowledged {ack.bytes_received} of {payload.nbytes} bytes"
            )
        return TransferResult(payload.nbytes, time.perf_counter() - t0)

    @abstractmethod
    def _send(self, decode_addr: str, payload: KVPayload) -> kv_pb2.KVAck:
        """Move the payload; return the receiver's ack (may raise grpc.RpcError, OSError, ...)."""

    def push_callable(self, decode_addr: str) -> grpc.StreamUnaryMultiCallable:
        """Push on a connected channel; requests are serialized KVChunks (kv_wire), sent as is."""
        return self.channel(decode_addr).stream_unary(
            PUSH_METHOD, request_serializer=None, response_deserializer=kv_pb2.KVAck.FromString
        )

    def channel(self, decode_addr: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(decode_addr)
        if ch is not None:
            return ch
        ch = connect(decode_addr, self.connect_timeout)
        with self._lock:
            old = self._channels.setdefault(decode_addr, ch)
        if old is not ch:
            ch.close()
        return old

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()

    def __enter__(self) -> KVSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(addr: str, timeout: float) -> grpc.Channel:
    """A channel that is READY, or KVTransferError: at once if the connection is refused, after
    `timeout` if nothing answers."""
    ch = internal_channel(addr, GRPC_OPTIONS)
    done = threading.Event()
    state: list[grpc.ChannelConnectivity] = []

    def watch(s: grpc.ChannelConnectivity) -> None:
        state.append(s)
        if s in (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                 grpc.ChannelConnectivity.SHUTDOWN):
            done.set()

    ch.subscribe(watch, try_to_connect=True)
    done.wait(timeout)
    ch.unsubscribe(watch)
    last = state[-1] if state else None
    if last == grpc.ChannelConnectivity.READY:
        return ch
    ch.close()
    if last == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        raise KVTransferError(f"decode worker {addr} unreachable (connection failed)")
    raise KVTransferError(f"decode worker {addr} unreachable (no answer within {timeout:g}s)")


# ---- receiving ---------------------------------------------------------------------------------


class KVReceiver(ABC):
    """The decode side of one transport: turns a header (+ the rest of the stream) into a payload.

    Raises on anything wrong; the service turns that into a refusal. Must leave nothing behind
    (no segment, no half-filled state) whether it returns or raises."""

    name: ClassVar[str]

    @abstractmethod
    def receive(
        self, header: kv_pb2.KVHeader, meta: KVMeta, rest: Iterator[bytes], active: Callable[[], bool]
    ) -> KVPayload:
        """`rest`: the stream after the header; `active()` turns False once the sender is gone."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the receiver holds across transfers (process groups, ...)."""


_SENDERS: dict[str, type[KVSender]] = {}
_RECEIVERS: dict[str, type[KVReceiver]] = {}


def register_transport(name: str, sender: type[KVSender], receiver: type[KVReceiver]) -> None:
    if name in _SENDERS:
        raise ValueError(f"KV transport {name!r} registered twice")
    sender.name = receiver.name = name
    _SENDERS[name] = sender
    _RECEIVERS[name] = receiver


def transport_names() -> list[str]:
    return sorted(_SENDERS)


def make_sender(name: str, **opts: Any) -> KVSender:
    """The sender of a registered transport ("grpc", "shm", "torch"), options as its constructor's."""
    if name not in _SENDERS:
        raise ValueError(f"unknown KV transport {name!r}; known: {', '.join(transport_names())}")
    return _SENDERS[name](**opts)


class KVReceiverService:
    """The KVTransfer servicer of a decode worker: one Push per transfer, any registered transport.

    `on_payload` runs on a gRPC thread once the payload is complete; if it raises (e.g. the decode
    pools are full) the sender gets KVTransferError with that reason, and nothing was installed.
    `receiver_opts` maps a transport name to its receiver's constructor options."""

    def __init__(self, on_payload: OnPayload, receiver_opts: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.on_payload = on_payload
        self._opts = dict(receiver_opts or {})
        self._receivers: dict[str, KVReceiver] = {}
        self._lock = threading.Lock()
        # the service's last reference to a payload dies here, off the sender's clock:
        # freeing hundreds of MiB (munmap, tmpfs pages) takes ~0.1 s
        self._free = ThreadPoolExecutor(1, thread_name_prefix="kv-free")

    def receiver(self, transport: str) -> KVReceiver:
        with self._lock:
            if transport not in self._receivers:
                if transport not in _RECEIVERS:
                    raise KVWireError(f"unknown KV transport {transport!r}; known: {', '.join(transport_names())}")
                self._receivers[transport] = _RECEIVERS[transport](**self._opts.get(transport, {}))
            return self._receivers[transport]

    def Push(self, request_iterator: Iterator[bytes], context: grpc.ServicerContext) -> kv_pb2.KVAck:  # noqa: N802
        rid = "?"
        try:
            first = next(request_iterator, None)
            if first is None:
                raise KVWireError("empty KV stream")
            header = decode_chunk(first)
            if not isinstance(header, kv_pb2.KVHeader):
                raise KVWireError("KV stream does not start with a header")
            rid = header.rid
            meta = meta_from_header(header)
            payload = self.receiver(header.transport).receive(header, meta, request_iterator, context.is_active)
        except Exception as exc:  # every failure is the sender's KVTransferError, never a crash
            log.warning("KV of %r not received: %s", rid, exc)
            return kv_pb2.KVAck(ok=False, error=f"{type(exc).__name__}: {exc}")
        nbytes = payload.nbytes
        try:
            self.on_payload(payload)
        except Exception as exc:
            log.info("KV of %r refused: %s", rid, exc)
            return kv_pb2.KVAck(ok=False, error=f"{type(exc).__name__}: {exc}")
        finally:
            box = [payload]
            del payload
            self._free.submit(box.clear)
        return kv_pb2.KVAck(ok=True, bytes_received=nbytes)

    def close(self) -> None:
        with self._lock:
            receivers, self._receivers = list(self._receivers.values()), {}
        for r in receivers:
            r.close()
        self._free.shutdown(wait=False)


def add_kv_receiver(
    server: grpc.Server, on_payload: OnPayload, **receiver_opts: Mapping[str, Any]
) -> KVReceiverService:
    """Serve KVTransfer on a decode worker's grpc.Server (create the server with GRPC_OPTIONS).

    Wire-compatible with the generated kv_pb2_grpc stub; registered by hand so that data chunks
    reach kv_wire undecoded (one copy fewer). Example: `add_kv_receiver(server, engine_install,
    shm={"sweep_interval": 10.0})`."""
    service = KVReceiverService(on_payload, receiver_opts)
    handler = grpc.method_handlers_generic_handler(
        "swaserve.kv.KVTransfer",
        {
            "Push": grpc.stream_unary_rpc_method_handler(
                service.Push, request_deserializer=None, response_serializer=kv_pb2.KVAck.SerializeToString
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    return service
