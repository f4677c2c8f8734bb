"""The hand-framed length-delimited field against protobuf's own encoding, on random sizes."""

from __future__ import annotations

import random

import pytest

from services.common.proto_field import FieldError, encode_field, field_view, varint
from services.proto_gen import gcache_pb2, kv_pb2


def test_frames_are_protobufs_bytes_both_ways() -> None:
    rng = random.Random(19)
    sizes = [0, 1, 127, 128, 16383, 16384, 2_097_151, 2_097_152] + [rng.randrange(1 << 22) for _ in range(8)]
    for size in sizes:
        data = rng.randbytes(size)
        cut = rng.randrange(size + 1)
        for tag, message in ((0x12, kv_pb2.KVChunk), (0x1A, gcache_pb2.PutFrame)):
            raw = encode_field(tag, [data[:cut], memoryview(data)[cut:]])
            assert raw == message(data=data).SerializeToString()
            assert message.FromString(raw).data == data
            assert bytes(field_view(tag, raw)) == data  # type: ignore[arg-type]


def test_varint_is_protobufs() -> None:
    rng = random.Random(7)
    randoms = [rng.randrange(1 << rng.randrange(1, 63)) | 1 for _ in range(200)]
    for n in [1, 127, 128, (1 << 63) - 1, *randoms]:
        # KVHeader.total_bytes is field 7, an int64: tag 0x38 then the varint (0 is not written)
        assert kv_pb2.KVHeader(total_bytes=n).SerializeToString() == b"\x38" + varint(n)
    assert varint(0) == b"\x00"


def test_another_tag_is_none_and_a_bad_length_an_error() -> None:
    good = encode_field(0x1A, [b"abcdef"])
    assert field_view(0x12, good) is None and field_view(0x12, b"") is None
    with pytest.raises(FieldError, match="says 6 bytes, holds 5"):
        field_view(0x1A, good[:-1])
    with pytest.raises(FieldError, match="bad length"):
        field_view(0x1A, bytes([0x1A]) + b"\xff" * 11)
    with pytest.raises(ValueError):
        varint(-1)
