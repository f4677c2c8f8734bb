"""Hand-framed data frames are byte-identical to the generated classes, both ways."""

from __future__ import annotations

import os

import pytest

from services.gcache.results import PutCode
from services.gcache.wire import (
    GET_DATA_TAG,
    PUT_DATA_TAG,
    WireError,
    data_frame,
    data_frames,
    data_view,
    get_items_frame,
    item_stream,
    parse_put_frame,
    put_batch_frame,
    put_items_frame,
)
from services.proto_gen import gcache_pb2


@pytest.mark.parametrize("size", [0, 1, 127, 128, 16383, 16384, 1 << 20, (1 << 20) + 3])
def test_data_frames_match_generated_encoding(size):
    payload = os.urandom(size)
    assert data_frame(PUT_DATA_TAG, payload) == gcache_pb2.PutFrame(data=payload).SerializeToString()
    assert data_frame(GET_DATA_TAG, payload) == gcache_pb2.GetFrame(data=payload).SerializeToString()
    # and back: the generated parser reads ours, ours reads the generated encoding
    assert gcache_pb2.PutFrame.FromString(data_frame(PUT_DATA_TAG, payload)).data == payload
    raw = gcache_pb2.GetFrame(data=payload).SerializeToString()
    view = data_view(GET_DATA_TAG, raw) if size else memoryview(b"")
    assert view is not None and bytes(view) == payload


def test_values_are_cut_into_chunks_and_reassemble():
    value = os.urandom(5 * 1000 + 7)
    frames = list(data_frames(PUT_DATA_TAG, value, chunk_bytes=1000))
    assert len(frames) == 6
    parts = [data_view(PUT_DATA_TAG, f) for f in frames]
    assert all(p is not None and len(p) <= 1000 for p in parts)
    assert b"".join(bytes(p) for p in parts if p is not None) == value
    assert list(data_frames(PUT_DATA_TAG, b"")) == []


def test_other_frames_are_not_data_and_parse_with_the_generated_classes():
    key = os.urandom(16)
    items = put_items_frame(
        [
            gcache_pb2.PutItem(key=key, size=42, shm_offset=128),
            gcache_pb2.PutItem(key=key, size=2, value=b"ab"),
        ]
    )
    assert data_view(PUT_DATA_TAG, items) is None
    parsed = parse_put_frame(items)
    assert parsed.WhichOneof("body") == "items"
    first, second = parsed.items.items
    assert (first.key, first.size, first.WhichOneof("place"), first.shm_offset) == (
        key,
        42,
        "shm_offset",
        128,
    )
    assert (second.WhichOneof("place"), second.value) == ("value", b"ab")
    head = parse_put_frame(put_batch_frame(migration=True, arena="a", sender="s"))
    assert head.WhichOneof("body") == "batch" and head.batch.migration and head.batch.arena == "a"


def test_item_stream_sends_every_item_first_then_the_data_in_item_order():
    def item(i: int) -> gcache_pb2.PutItem:
        return gcache_pb2.PutItem(key=bytes(16), size=i)

    big, small = os.urandom(2500), os.urandom(700)
    entries = [
        (item(1), 600, None),
        (item(2), 600, None),
        (item(3), 0, big),
        (item(4), 0, small),
        (item(5), 10, None),
    ]
    frames = list(item_stream(entries, put_items_frame, PUT_DATA_TAG, chunk_bytes=1000))
    kinds = [parse_put_frame(f).WhichOneof("body") for f in frames]
    # 1+2 pass 1000 inline bytes: a frame; 3, 4, 5: a frame; then big in 3 frames, small in 1
    assert kinds == ["items", "items", "data", "data", "data", "data"]
    sizes = [
        [i.size for i in parse_put_frame(f).items.items] for f in frames if data_view(PUT_DATA_TAG, f) is None
    ]
    assert sizes == [[1, 2], [3, 4, 5]]
    data = [bytes(v) for f in frames if (v := data_view(PUT_DATA_TAG, f)) is not None]
    assert [len(d) for d in data] == [1000, 1000, 500, 700]  # a value's frames are its own
    assert b"".join(data) == big + small
    many = list(item_stream([(item(0), 0, None)] * 5, put_items_frame, PUT_DATA_TAG, max_items=2))
    assert [len(parse_put_frame(f).items.items) for f in many] == [2, 2, 1]
    got = list(item_stream([(gcache_pb2.GetItem(index=7), 0, None)], get_items_frame, GET_DATA_TAG))
    assert [i.index for i in gcache_pb2.GetFrame.FromString(got[0]).items.items] == [7]


def test_bad_frames_raise():
    good = data_frame(PUT_DATA_TAG, b"abcdef")
    with pytest.raises(WireError):
        data_view(PUT_DATA_TAG, good[:-1])  # length says 6, 5 follow
    with pytest.raises(WireError):
        data_view(PUT_DATA_TAG, bytes([PUT_DATA_TAG]) + b"\xff" * 11)  # endless varint
    with pytest.raises(WireError):
        parse_put_frame(b"\xff\xff\xff")


def test_put_codes_match_the_proto_enum():
    assert {c.name: c.value for c in PutCode} == dict(gcache_pb2.PutCode.items())
