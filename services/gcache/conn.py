"""One node's RPCs, client side: batches in, results out, gRPC errors raised as NodeError.

The client (client.py) and a draining node (drain.py) both talk to nodes through this. Values go
as data frames, or through a slot of the caller's shm arena when one is given (arena.py); a node's
data plane (data_conn.py) carries them otherwise, with the same results and errors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from services.common.grpc_auth import internal_channel
from services.gcache.arena import ClientArena, Slot, align
from services.gcache.results import PutCode, PutOutcome
from services.gcache.wire import (
    GET_DATA_TAG,
    GRPC_OPTIONS,
    INLINE_BYTES,
    PUT_DATA_TAG,
    Buffer,
    WireError,
    data_view,
    item_stream,
    method,
    parse_get_frame,
    put_batch_frame,
    put_items_frame,
)
from services.proto_gen import gcache_pb2


class NodeError(RuntimeError):
    """A call to a node failed as a whole (unreachable, timed out, refused the stream)."""

    def __init__(self, addr: str, code: grpc.StatusCode | None, detail: str) -> None:
        super().__init__(f"gcache node {addr}: {code.name if code else 'error'}: {detail}")
        self.addr = addr
        self.code = code

    @property
    def unreachable(self) -> bool:
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None)

    @property
    def shm_refused(self) -> bool:
        return self.code == grpc.StatusCode.FAILED_PRECONDITION


def put_outcomes(addr: str, reply: gcache_pb2.PutReply, n: int) -> list[PutOutcome]:
    """A put reply's statuses, one per item of the `n` sent; any other count is NodeError."""
    if len(reply.statuses) != n:
        raise NodeError(addr, None, f"{len(reply.statuses)} statuses for {n} items")
    return [PutOutcome(PutCode(s.code), s.error) for s in reply.statuses]


@dataclass(frozen=True)
class PutResult:
    statuses: list[PutOutcome]  # one per item, in order
    shm_bytes: int
    grpc_bytes: int
    data_bytes: int = 0  # through the data plane (data_conn.py)


@dataclass(frozen=True)
class GetResult:
    values: dict[int, memoryview]  # request index -> value
    shm_bytes: int
    grpc_bytes: int
    data_bytes: int = 0  # through the data plane (data_conn.py)


class _Incoming:
    """One value arriving as data frames."""

    def __init__(self, index: int, size: int) -> None:
        self.index, self.size, self.filled = index, size, 0
        self.parts: list[memoryview] = []

    def add(self, data: memoryview) -> bool:
        """Take a frame's data; True once the value is complete."""
        if self.filled + len(data) > self.size:
            raise WireError(f"more data than the item's {self.size} bytes")
        self.parts.append(data)
        self.filled += len(data)
        return self.filled == self.size

    def value(self) -> memoryview:
        """One frame: a view of it (no copy); several: joined (one copy, no zero-filling)."""
        whole = self.parts[0] if len(self.parts) == 1 else memoryview(b"".join(self.parts))
        return whole.toreadonly()


class NodeConn:
    """A channel to one node; thread-safe; `close()` when the node leaves."""

    def __init__(self, addr: str, timeout: float = 30.0) -> None:
        self.addr = addr
        self.timeout = timeout
        self.channel = internal_channel(addr, GRPC_OPTIONS)
        self._put = self.channel.stream_unary(
            method("BatchPut"), request_serializer=None, response_deserializer=gcache_pb2.PutReply.FromString
        )
        self._get = self.channel.unary_stream(
            method("BatchGet"),
            request_serializer=gcache_pb2.GetRequest.SerializeToString,
            response_deserializer=None,
        )
        self._exists = self.channel.unary_unary(
            method("BatchExists"), request_serializer=gcache_pb2.ExistsRequest.SerializeToString,
            response_deserializer=gcache_pb2.ExistsReply.FromString,
        )  # fmt: skip
        self._delete = self.channel.unary_unary(
            method("Delete"), request_serializer=gcache_pb2.DeleteRequest.SerializeToString,
            response_deserializer=gcache_pb2.DeleteReply.FromString,
        )  # fmt: skip
        self._stats = self.channel.unary_unary(
            method("Stats"), request_serializer=gcache_pb2.StatsRequest.SerializeToString,
            response_deserializer=gcache_pb2.StatsReply.FromString,
        )  # fmt: skip

    def _fail(self, e: grpc.RpcError) -> NodeError:
        return NodeError(self.addr, e.code(), e.details() or "")  # type: ignore[attr-defined]

    # -- put -------------------------------------------------------------------------------------
    def put(self, items: Sequence[tuple[bytes, Buffer]], arena: ClientArena | None = None, slot: Slot | None = None,
            migration: bool = False, sender: str = "") -> PutResult:  # fmt: skip
        """Store items; returns one status per item and the bytes that went each way.

        Items that fit in `slot` (in order) are copied there; the rest stream as data frames."""
        placed: dict[int, int] = {}
        if arena is not None and slot is not None:
            used = 0
            for i, (_, value) in enumerate(items):
                n = len(value)
                if used + n > slot.length:
                    continue
                arena.view[slot.offset + used : slot.offset + used + n] = memoryview(value).cast("B")
                placed[i] = slot.offset + used
                used = align(used + n)
        shm_bytes = sum(len(items[i][1]) for i in placed)

        def entries() -> Iterator[tuple[gcache_pb2.PutItem, int, Buffer | None]]:
            for i, (key, value) in enumerate(items):
                item = gcache_pb2.PutItem(key=bytes(key), size=len(value))
                off = placed.get(i)
                if off is not None:
                    item.shm_offset = off
                    yield item, 0, None
                elif len(value) <= INLINE_BYTES:
                    item.value = bytes(value)
                    yield item, len(value), None
                else:
                    yield item, 0, value

        def frames() -> Iterator[bytes]:
            yield put_batch_frame(migration, arena.name if placed and arena else "", sender)
            yield from item_stream(entries(), put_items_frame, PUT_DATA_TAG)

        try:
            reply: gcache_pb2.PutReply = self._put(frames(), timeout=self.timeout)
        except grpc.RpcError as e:
            raise self._fail(e) from e
        statuses = put_outcomes(self.addr, reply, len(items))
        return PutResult(statuses, shm_bytes, sum(len(v) for _, v in items) - shm_bytes)

    # -- get -------------------------------------------------------------------------------------
    def get(
        self, keys: Sequence[bytes], arena: ClientArena | None = None, slot: Slot | None = None
    ) -> GetResult:
        """The values found, by index into `keys`; found values are copied out of the slot."""
        request = gcache_pb2.GetRequest(keys=[bytes(k) for k in keys])
        if arena is not None and slot is not None:
            request.shm.arena, request.shm.offset, request.shm.length = arena.name, slot.offset, slot.length
        values: dict[int, memoryview] = {}
        shm_bytes = grpc_bytes = 0
        pending: deque[_Incoming] = deque()  # declared, waiting for data frames
        try:
            for raw in self._get(request, timeout=self.timeout):
                data = data_view(GET_DATA_TAG, raw)
                if data is not None:
                    if not pending:
                        raise WireError("data frame with no value waiting for it")
                    grpc_bytes += len(data)
                    if pending[0].add(data):
                        done = pending.popleft()
                        values[done.index] = done.value()
                    continue
                frame = parse_get_frame(raw)
                if frame.WhichOneof("body") != "items" or (pending and pending[0].filled):
                    raise WireError("items frame inside a value, or an unknown frame")
                for item in frame.items.items:
                    if item.index >= len(keys):
                        raise WireError(f"item index {item.index} beyond {len(keys)} keys")
                    place = item.WhichOneof("place")
                    if place == "shm_offset":
                        values[item.index] = self._from_slot(item, arena, slot)
                        shm_bytes += item.size
                    elif place == "value" or item.size == 0:
                        if len(item.value) != item.size:
                            raise WireError(f"item carries {len(item.value)} bytes, says {item.size}")
                        values[item.index] = memoryview(item.value)
                        grpc_bytes += item.size
                    else:
                        pending.append(_Incoming(item.index, item.size))
        except grpc.RpcError as e:
            raise self._fail(e) from e
        except WireError as e:
            raise NodeError(self.addr, None, f"bad BatchGet stream: {e}") from e
        if pending:
            raise NodeError(self.addr, None, f"BatchGet stream ended with {len(pending)} value(s) incomplete")
        return GetResult(values, shm_bytes, grpc_bytes)

    @staticmethod
    def _from_slot(item: gcache_pb2.GetItem, arena: ClientArena | None, slot: Slot | None) -> memoryview:
        if arena is None or slot is None:
            raise WireError("node answered in shm without a region")
        start = item.shm_offset
        if start < slot.offset or start + item.size > slot.offset + slot.length:
            raise WireError("shm item outside the slot")
        return memoryview(bytes(arena.view[start : start + item.size]))

    # -- unary -----------------------------------------------------------------------------------
    def exists(self, keys: Sequence[bytes]) -> list[bool]:
        try:
            reply = self._exists(
                gcache_pb2.ExistsRequest(keys=[bytes(k) for k in keys]), timeout=self.timeout
            )
        except grpc.RpcError as e:
            raise self._fail(e) from e
        if len(reply.present) != len(keys):
            raise NodeError(self.addr, None, f"{len(reply.present)} answers for {len(keys)} keys")
        return list(reply.present)

    def delete(self, keys: Sequence[bytes]) -> int:
        try:
            return int(
                self._delete(
                    gcache_pb2.DeleteRequest(keys=[bytes(k) for k in keys]), timeout=self.timeout
                ).deleted
            )
        except grpc.RpcError as e:
            raise self._fail(e) from e

    def stats(self) -> gcache_pb2.StatsReply:
        try:
            reply: gcache_pb2.StatsReply = self._stats(gcache_pb2.StatsRequest(), timeout=self.timeout)
            return reply
        except grpc.RpcError as e:
            raise self._fail(e) from e

    def close(self) -> None:
        self.channel.close()
