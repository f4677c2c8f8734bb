"""Frames of the BatchPut and BatchGet streams (proto/gcache.proto), with data framed by hand.

    BatchPut   PutFrame{batch} , PutFrame{items}+ , PutFrame{data}*             -> PutReply
    BatchGet   GetRequest -> GetFrame{items}* , GetFrame{data}*                 (found keys only)

Items frames come first and declare every value: where its bytes are (in shared memory, inside the
item for values up to INLINE_BYTES, or to follow as data). Then the values to follow come as data
frames of at most CHUNK_BYTES, in item order, a value's frames never shared with the next value.
So a batch costs about one message per MiB of data plus one per ~8k items, not a message per
value (each message costs a round trip in a synchronous gRPC stream).

Data frames are built and parsed by hand (services/common/proto_field.py), byte-identical to the
generated classes' encoding (tag, varint length, bytes): one copy on the way out (the join) and none on the way in (a view of the
received frame), where the generated classes copy 2-3 times. Items and everything else go through
the generated classes; tests check both directions against them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from services.common.proto_field import FieldError, encode_field, field_view
from services.proto_gen import gcache_pb2

CHUNK_BYTES = 1 << 20  # data bytes per frame: 1 MiB streams faster than 4 (HTTP/2 flow control)
INLINE_BYTES = 64 << 10  # values up to this size travel inside their item
MAX_MESSAGE_BYTES = 64 << 20  # set on both ends: gRPC's default 4 MiB would refuse a 4 MiB frame
GRPC_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

PUT_DATA_TAG = 0x1A  # PutFrame.data: field 3, length-delimited
GET_DATA_TAG = 0x12  # GetFrame.data: field 2, length-delimited

SERVICE = "swaserve.gcache.GCache"
Buffer = bytes | bytearray | memoryview


class WireError(ValueError):
    """A stream that does not follow the frame grammar above."""


def data_frame(tag: int, piece: Buffer) -> bytes:
    """One serialized data frame holding `piece` (one copy)."""
    return encode_field(tag, (piece,))


def data_frames(tag: int, value: Buffer, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The value as data frames of at most chunk_bytes each (nothing for an empty value)."""
    view = memoryview(value).cast("B")
    for off in range(0, len(view), chunk_bytes):
        yield data_frame(tag, view[off : off + chunk_bytes])


def data_view(tag: int, raw: bytes) -> memoryview | None:
    """The payload of a data frame with this tag, as a view of `raw`; None if `raw` is another frame."""
    try:
        return field_view(tag, raw)
    except FieldError as e:
        raise WireError(str(e)) from None


def put_batch_frame(migration: bool = False, arena: str = "", sender: str = "") -> bytes:
    return gcache_pb2.PutFrame(
        batch=gcache_pb2.PutBatch(migration=migration, arena=arena, sender=sender)
    ).SerializeToString()


def put_items_frame(items: list[gcache_pb2.PutItem]) -> bytes:
    return gcache_pb2.PutFrame(items=gcache_pb2.PutItems(items=items)).SerializeToString()


def parse_put_frame(raw: bytes) -> gcache_pb2.PutFrame:
    try:
        return gcache_pb2.PutFrame.FromString(raw)
    except Exception as e:  # protobuf's DecodeError differs between implementations
        raise WireError(f"not a PutFrame: {e}") from e


def get_items_frame(items: list[gcache_pb2.GetItem]) -> bytes:
    return gcache_pb2.GetFrame(items=gcache_pb2.GetItems(items=items)).SerializeToString()


def parse_get_frame(raw: bytes) -> gcache_pb2.GetFrame:
    try:
        return gcache_pb2.GetFrame.FromString(raw)
    except Exception as e:
        raise WireError(f"not a GetFrame: {e}") from e


Item = TypeVar("Item", gcache_pb2.PutItem, gcache_pb2.GetItem)


def item_stream(entries: Iterable[tuple[Item, int, Buffer | None]], encode: Callable[[list[Item]], bytes],
                data_tag: int, chunk_bytes: int = CHUNK_BYTES, max_items: int = 8192) -> Iterator[bytes]:  # fmt: skip
    """Frames for (item, bytes inside the item, value to send as data frames or None): every item
    first, grouped until ~chunk_bytes ride inside a group or max_items, then the data values in
    item order."""
    group: list[Item] = []
    inline = 0
    later: list[Buffer] = []
    for item, inside, data in entries:
        group.append(item)
        inline += inside
        if data is not None:
            later.append(data)
        if inline >= chunk_bytes or len(group) >= max_items:
            yield encode(group)
            group, inline = [], 0
    if group:
        yield encode(group)
    for data in later:
        yield from data_frames(data_tag, data, chunk_bytes)


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"
