"""The default transport, any host: the payload's bytes as 1 MiB data chunks of the Push stream.

The sender reads the tensors in place and frames each chunk in one copy (kv_wire); gRPC's flow
control paces the stream, so the sender never holds more than a few chunks beyond the payload.
The receiver copies each chunk straight into the final tensors and hands over the payload only
when exactly `total_bytes` arrived.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_transport.base import KVReceiver, KVSender, register_transport
from services.common.kv_wire import CHUNK_BYTES, assemble, chunk_stream, header_from_meta
from services.proto_gen import kv_pb2


class GrpcSender(KVSender):
    def __init__(self, timeout: float = 60.0, connect_timeout: float = 5.0, chunk_bytes: int = CHUNK_BYTES) -> None:
        super().__init__(timeout, connect_timeout)
        self.chunk_bytes = chunk_bytes

    def _send(self, decode_addr: str, payload: KVPayload) -> kv_pb2.KVAck:
        push = self.push_callable(decode_addr)
        header = header_from_meta(payload.meta, self.name)
        ack: kv_pb2.KVAck = push(chunk_stream(header, payload, self.chunk_bytes), timeout=self.timeout)
        return ack


class GrpcReceiver(KVReceiver):
    def receive(
        self, header: kv_pb2.KVHeader, meta: KVMeta, rest: Iterator[bytes], active: Callable[[], bool]
    ) -> KVPayload:
        return assemble(meta, rest)


register_transport("grpc", GrpcSender, GrpcReceiver)
