"""The GCache gRPC service: a thin adapter from frames (wire.py) to the BlockStore.

Streams use raw bytes (no generated (de)serializers) so data frames are parsed without copies;
unary calls use the generated messages. Errors map to status codes here and only here:
a broken stream grammar or an arena the node cannot use -> INVALID_ARGUMENT / FAILED_PRECONDITION;
per-key outcomes (too large, disk failed) are not errors but PutStatus entries.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import grpc

from services.gcache.arena import ArenaError, ArenaMap, align
from services.gcache.store import BlockStore, PutCode, PutOutcome
from services.gcache.wire import (
    GET_DATA_TAG,
    INLINE_BYTES,
    PUT_DATA_TAG,
    SERVICE,
    WireError,
    data_view,
    get_items_frame,
    item_stream,
    parse_put_frame,
)
from services.proto_gen import gcache_pb2

log = logging.getLogger(__name__)


class _ItemReader:
    """Collects one value from data frames: a view of the frame when one frame holds it all."""

    def __init__(self, key: bytes, size: int, skip: PutOutcome | None) -> None:
        self.key, self.size, self.skip = key, size, skip
        self.filled = 0
        self.parts: list[memoryview] = []
        self.single: memoryview | None = None

    @property
    def done(self) -> bool:
        return self.filled == self.size

    def add(self, data: memoryview) -> None:
        if self.filled + len(data) > self.size:
            raise WireError(f"a data frame runs past the end of item {self.key.hex()} ({self.size} bytes)")
        if self.skip is None:
            self.parts.append(data)
        self.filled += len(data)

    def value(self) -> memoryview:
        """One frame: a view of it (no copy); several: joined (one copy, no zero-filling)."""
        if self.single is not None:
            return self.single
        if len(self.parts) == 1:
            return self.parts[0]
        return memoryview(b"".join(self.parts))


class PutTally:
    """One put's counts, as both put paths (BatchPut, the data plane) keep them, and its statuses: bytes
    received (values not refused up front) and blocks a migration stored."""

    def __init__(self, migration: bool) -> None:
        self.migration = migration
        self.received = self.migrated_blocks = self.migrated_bytes = 0

    def status(self, outcome: PutOutcome, size: int, received: bool) -> gcache_pb2.PutStatus:
        """The item's status; `received`: its value was read, not refused up front."""
        if received:
            self.received += size
        if outcome.ok and self.migration:
            self.migrated_blocks += 1
            self.migrated_bytes += size
        return gcache_pb2.PutStatus(code=outcome.code.name, error=outcome.error)

    def reply(self, store: BlockStore, statuses: list[gcache_pb2.PutStatus]) -> gcache_pb2.PutReply:
        """The reply, the blocks a migration stored counted in the store."""
        if self.migrated_blocks:
            store.count_migration("received", self.migrated_blocks, self.migrated_bytes)
        return gcache_pb2.PutReply(statuses=statuses, bytes_received=self.received)


def found_items(
    store: BlockStore, keys: Iterable[bytes], active: Callable[[], bool] = lambda: True
) -> Iterator[tuple[gcache_pb2.GetItem, memoryview]]:
    """(item, value) per key the store has, item.index its position in `keys`; stops once `active()`
    is false (checked before each lookup)."""
    for i, key in enumerate(keys):
        if not active():
            return
        found = store.get(key)
        if found is None:
            continue
        yield gcache_pb2.GetItem(index=i, size=len(found.value), tier=found.tier), found.value


class GCacheService:
    def __init__(self, store: BlockStore, node_id: str, addr: str, arenas: ArenaMap | None = None,
                 draining: Callable[[], bool] = lambda: False,
                 extra_counters: Callable[[], dict[str, int]] = dict) -> None:  # fmt: skip
        self.store = store
        self.node_id = node_id
        self.addr = addr
        self.arenas = arenas or ArenaMap()
        self.draining = draining
        self.extra_counters = extra_counters  # the node's other counters (its data plane's), for Stats
        self.shm_bytes_in = 0
        self.shm_bytes_out = 0

    # -- BatchPut --------------------------------------------------------------------------------
    def batch_put(self, frames: Iterator[bytes], context: grpc.ServicerContext) -> gcache_pb2.PutReply:
        try:
            return self._batch_put(frames)
        except (WireError, ArenaError) as e:
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if isinstance(e, ArenaError)
                else grpc.StatusCode.INVALID_ARGUMENT
            )
            context.abort(code, str(e))
            raise  # not reached: abort raises

    def _batch_put(self, frames: Iterator[bytes]) -> gcache_pb2.PutReply:
        first = next(frames, None)
        if first is None:
            return gcache_pb2.PutReply()
        head = parse_put_frame(first)
        if head.WhichOneof("body") != "batch":
            raise WireError("a BatchPut stream starts with a batch frame")
        batch = head.batch
        statuses: list[gcache_pb2.PutStatus | None] = []
        pending: deque[tuple[int, _ItemReader]] = deque()  # declared, waiting for data frames
        tally = PutTally(batch.migration)

        def finish(pos: int, item: _ItemReader) -> None:
            outcome = item.skip or self.store.put(item.key, item.value())
            statuses[pos] = tally.status(outcome, item.size, received=item.skip is None)

        for raw in frames:
            data = data_view(PUT_DATA_TAG, raw)
            if data is not None:
                if not pending:
                    raise WireError("data frame with no value waiting for it")
                pos, head_item = pending[0]
                head_item.add(data)
                if head_item.done:
                    pending.popleft()
                    finish(pos, head_item)
                continue
            frame = parse_put_frame(raw)
            if frame.WhichOneof("body") != "items":
                raise WireError(f"unexpected {frame.WhichOneof('body')} frame in a BatchPut stream")
            if pending and pending[0][1].filled:
                raise WireError("items frame in the middle of a value's data")
            for item in frame.items.items:
                reader = self._read_item(item, batch.arena)
                statuses.append(None)
                if reader.done:
                    finish(len(statuses) - 1, reader)
                else:
                    pending.append((len(statuses) - 1, reader))
        if pending:
            pos, item = pending[0]
            raise WireError(f"stream ended with {len(pending)} value(s) incomplete, first {item.key.hex()}")
        done = [st for st in statuses if st is not None]  # all of them: nothing is pending
        return tally.reply(self.store, done)

    def _read_item(self, item: gcache_pb2.PutItem, arena: str) -> _ItemReader:
        """An item's reader, complete already unless its value follows as data frames."""
        key = bytes(item.key)
        reader = _ItemReader(key, item.size, self.store.check_put(key, item.size))
        place = item.WhichOneof("place")
        if place is None:
            return reader
        if place == "value":
            value = memoryview(item.value)
            if len(value) != item.size:
                raise WireError(f"item {key.hex()} carries {len(value)} bytes, says {item.size}")
            reader.single = value
        else:
            region = self.arenas.region(arena, item.shm_offset, item.size)
            if reader.skip is None:
                reader.single = memoryview(bytes(region))  # the store keeps its own copy
                self.shm_bytes_in += item.size
        reader.filled = item.size
        return reader

    # -- BatchGet --------------------------------------------------------------------------------
    def batch_get(self, request: gcache_pb2.GetRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        region = None
        if request.HasField("shm") and request.shm.length > 0:
            try:
                region = self.arenas.region(request.shm.arena, request.shm.offset, request.shm.length)
            except ArenaError as e:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        found = list(self._found(request, region, context))  # items first: look every key up
        yield from item_stream(found, get_items_frame, GET_DATA_TAG)

    def _found(self, request: gcache_pb2.GetRequest, region: memoryview | None,
               context: grpc.ServicerContext) -> Iterator[tuple[gcache_pb2.GetItem, int, memoryview | None]]:  # fmt: skip
        """(item, bytes inside it, value to stream) per found key, the values copied into the region
        while they fit, small ones inside their item, the rest as data frames."""
        used = 0
        for item, value in found_items(self.store, request.keys, context.is_active):
            size = item.size
            if region is not None and used + size <= len(region):
                region[used : used + size] = value
                item.shm_offset = request.shm.offset + used
                used = align(used + size)
                self.shm_bytes_out += size
                yield item, 0, None
            elif size <= INLINE_BYTES:
                item.value = bytes(value)
                yield item, size, None
            else:
                yield item, 0, value

    # -- unary -----------------------------------------------------------------------------------
    def batch_exists(
        self, request: gcache_pb2.ExistsRequest, context: grpc.ServicerContext
    ) -> gcache_pb2.ExistsReply:
        return gcache_pb2.ExistsReply(present=[self.store.contains(k) for k in request.keys])

    def delete(
        self, request: gcache_pb2.DeleteRequest, context: grpc.ServicerContext
    ) -> gcache_pb2.DeleteReply:
        return gcache_pb2.DeleteReply(deleted=sum(self.store.delete(k) for k in request.keys))

    def stats(self, request: gcache_pb2.StatsRequest, context: grpc.ServicerContext) -> gcache_pb2.StatsReply:
        u = self.store.usage()
        counters = self.store.counters_snapshot()
        counters.update(
            shm_bytes_in=self.shm_bytes_in, shm_bytes_out=self.shm_bytes_out, shm_arenas=len(self.arenas)
        )
        counters.update(self.extra_counters())
        return gcache_pb2.StatsReply(
            node_id=self.node_id, addr=self.addr,
            memory_used_bytes=u.memory_used, memory_capacity_bytes=u.memory_capacity, memory_blocks=u.memory_blocks,
            disk_used_bytes=u.disk_used, disk_capacity_bytes=u.disk_capacity, disk_blocks=u.disk_blocks,
            counters=counters, draining=self.draining(),
        )  # fmt: skip

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "BatchPut": grpc.stream_unary_rpc_method_handler(
                    self.batch_put, request_deserializer=None,
                    response_serializer=gcache_pb2.PutReply.SerializeToString,
                ),
                "BatchGet": grpc.unary_stream_rpc_method_handler(
                    self.batch_get, request_deserializer=gcache_pb2.GetRequest.FromString, response_serializer=None
                ),
                "BatchExists": grpc.unary_unary_rpc_method_handler(
                    self.batch_exists, request_deserializer=gcache_pb2.ExistsRequest.FromString,
                    response_serializer=gcache_pb2.ExistsReply.SerializeToString,
                ),
                "Delete": grpc.unary_unary_rpc_method_handler(
                    self.delete, request_deserializer=gcache_pb2.DeleteRequest.FromString,
                    response_serializer=gcache_pb2.DeleteReply.SerializeToString,
                ),
                "Stats": grpc.unary_unary_rpc_method_handler(
                    self.stats, request_deserializer=gcache_pb2.StatsRequest.FromString,
                    response_serializer=gcache_pb2.StatsReply.SerializeToString,
                ),
            },
        )  # fmt: skip


def put_code_name(code: int) -> str:
    return PutCode(code).name
