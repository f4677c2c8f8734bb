"""kv_wire: header round trip, byte order, chunk framing vs the generated classes, stream checks."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import pytest
import torch

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_spec import KVLayerSpec, torch_dtype
from services.common.kv_wire import (
    KVWireError,
    PayloadAssembler,
    assemble,
    chunk_stream,
    decode_chunk,
    encode_data_chunk,
    encode_header_chunk,
    header_from_meta,
    iter_pieces,
    meta_from_header,
    payload_views,
    tensor_bytes,
)
from services.proto_gen import kv_pb2

FULL = KVLayerSpec("full", 4, 192, 128)  # MiMo-V2-Flash: full layers 4 KV heads, SWA layers 8
SWA = KVLayerSpec("swa", 8, 192, 128)
MIMO_LAYERS = (FULL, SWA, SWA, SWA, SWA, FULL, SWA, SWA)


def mimo_meta(n: int, dtype: str = "bfloat16", rid: str = "r", window: int = 128, layers=MIMO_LAYERS) -> KVMeta:
    return KVMeta(rid, n, window, dtype, tuple(layers))


def random_payload(meta: KVMeta, seed: int = 0) -> KVPayload:
    """Random bit patterns (NaNs included): equality is checked on bits, never on values."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch_dtype(meta.dtype)

    def rand(shape: tuple[int, int, int]) -> torch.Tensor:
        nbytes = math.prod(shape) * meta.itemsize
        return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)

    n = len(meta.layers)
    return KVPayload(meta, [rand(meta.k_shape(i)) for i in range(n)], [rand(meta.v_shape(i)) for i in range(n)])


def payload_from_chunks(chunks: Iterable[bytes]) -> tuple[kv_pb2.KVHeader, KVPayload]:
    """Parse a whole grpc stream (header chunk then data chunks): the inverse of chunk_stream."""
    it = iter(chunks)
    first = next(it, None)
    if first is None:
        raise KVWireError("empty KV stream")
    header = decode_chunk(first)
    if not isinstance(header, kv_pb2.KVHeader):
        raise KVWireError("KV stream does not start with a header")
    return header, assemble(meta_from_header(header), it)


def payload_digest(p: KVPayload) -> str:
    h = hashlib.sha256(repr(p.meta).encode())
    for v in payload_views(p):
        h.update(v)
    return h.hexdigest()


def same_bits(a: KVPayload, b: KVPayload) -> bool:
    return a.meta == b.meta and all(
        bytes(x) == bytes(y) for x, y in zip(payload_views(a), payload_views(b), strict=True)
    )


@pytest.mark.parametrize("n", [0, 1, 100, 128, 129, 300])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_header_round_trip(n, dtype):
    meta = mimo_meta(n, dtype)
    header = header_from_meta(meta, "grpc")
    assert header.total_bytes == meta.nbytes
    again = kv_pb2.KVHeader.FromString(header.SerializeToString())
    assert meta_from_header(again) == meta


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda h: setattr(h, "dtype", "int8"), "unknown dtype"),
        (lambda h: setattr(h, "total_bytes", h.total_bytes + 1), "total_bytes"),
        (lambda h: setattr(h.layers[1], "kind", "local"), "bad layer 1"),
        (lambda h: setattr(h.layers[0], "kv_heads", 0), "bad layer 0"),
        (lambda h: setattr(h, "num_tokens", -1), "negative"),
    ],
)
def test_bad_headers_are_refused(mutate, msg):
    header = header_from_meta(mimo_meta(10), "grpc")
    mutate(header)
    with pytest.raises(KVWireError, match=msg):
        meta_from_header(header)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensor_bytes_is_a_view_not_a_copy(dtype):
    t = torch.zeros(3, 2, 4, dtype=getattr(torch, dtype))
    v = tensor_bytes(t)
    assert len(v) == t.numel() * t.element_size()
    v[0 : t.element_size()] = bytes([0x80] * t.element_size())  # a negative number's sign bit
    assert t.view(-1)[0].item() < 0 or torch.isnan(t.view(-1)[0])
    with pytest.raises(KVWireError, match="contiguous"):
        tensor_bytes(torch.zeros(4, 4).t())


def test_wire_order_is_k0_v0_k1_v1():
    meta = mimo_meta(5, "float32", layers=(FULL, SWA))
    p = random_payload(meta, 1)
    wire = b"".join(bytes(v) for v in payload_views(p))
    expected = b"".join(t.numpy().tobytes() for t in (p.k[0], p.v[0], p.k[1], p.v[1]))
    assert wire == expected and len(wire) == meta.nbytes


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20, 1 << 30])
def test_pieces_cover_the_bytes_in_order_with_full_chunks(chunk):
    views = [memoryview(bytes(range(i, i + n))) for i, n in ((0, 10), (10, 0), (10, 25), (35, 3))]
    chunks = list(iter_pieces(views, chunk))
    sizes = [sum(len(p) for p in c) for c in chunks]
    assert all(s == chunk for s in sizes[:-1]) and 0 < sizes[-1] <= chunk
    assert b"".join(bytes(p) for c in chunks for p in c) == bytes(range(38))


def test_hand_framed_chunks_are_protobuf():
    for size in (0, 1, 127, 128, 16383, 16384, (1 << 20) + 3):
        data = bytes(i % 251 for i in range(size))
        raw = encode_data_chunk([memoryview(data[: size // 2]), memoryview(data[size // 2 :])])
        assert raw == kv_pb2.KVChunk(data=data).SerializeToString()
        assert kv_pb2.KVChunk.FromString(raw).data == data
        assert bytes(decode_chunk(raw)) == data  # type: ignore[arg-type]
    header = header_from_meta(mimo_meta(3), "shm")
    header.shm.segments.append("swaserve-kv-1-x-0")
    decoded = decode_chunk(encode_header_chunk(header))
    assert isinstance(decoded, kv_pb2.KVHeader) and decoded == header
    with pytest.raises(KVWireError, match="empty"):
        decode_chunk(kv_pb2.KVChunk().SerializeToString())
    with pytest.raises(KVWireError, match="undecodable"):
        decode_chunk(b"\x12\x05ab")  # length says 5, 2 bytes follow


@pytest.mark.parametrize("n", [0, 3, 128, 200])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_stream_round_trip_bit_exact(n, dtype, chunk):
    p = random_payload(mimo_meta(n, dtype), seed=n)
    header, back = payload_from_chunks(chunk_stream(header_from_meta(p.meta, "grpc"), p, chunk))
    assert header.transport == "grpc"
    assert same_bits(p, back) and payload_digest(p) == payload_digest(back)


def _data_chunks(p: KVPayload, chunk: int = 4096) -> list[bytes]:
    return list(chunk_stream(header_from_meta(p.meta, "grpc"), p, chunk))[1:]


def test_truncated_stream_is_an_error_not_a_payload():
    p = random_payload(mimo_meta(50), 2)
    chunks = _data_chunks(p)
    last = len(decode_chunk(chunks[-1]))  # type: ignore[arg-type]
    with pytest.raises(KVWireError, match=f"truncated: {p.nbytes - last} of {p.nbytes} bytes"):
        assemble(p.meta, chunks[:-1])
    with pytest.raises(KVWireError, match="truncated"):
        assemble(p.meta, [])


def test_oversized_stream_fails_on_the_overflowing_chunk():
    p = random_payload(mimo_meta(50), 3)
    chunks = _data_chunks(p)
    with pytest.raises(KVWireError, match="oversized"):
        assemble(p.meta, [*chunks, encode_data_chunk([memoryview(b"x")])])
    asm = PayloadAssembler(p.meta)
    with pytest.raises(KVWireError, match="oversized"):
        asm.write(b"\0" * (p.nbytes + 1))
    assert asm.received == 0


def test_second_header_is_an_error():
    p = random_payload(mimo_meta(5), 4)
    with pytest.raises(KVWireError, match="second header"):
        assemble(p.meta, [encode_header_chunk(header_from_meta(p.meta, "grpc")), *_data_chunks(p)])
    with pytest.raises(KVWireError, match="start with a header"):
        payload_from_chunks(_data_chunks(p))


def test_adopted_tensors_must_cover_every_nonempty_tensor():
    p = random_payload(mimo_meta(5, "bfloat16", layers=(FULL, SWA)), 9)
    wire = [torch.frombuffer(bytearray(bytes(v)), dtype=torch.uint8) for v in payload_views(p)]
    asm = PayloadAssembler(p.meta, allocate=False)
    with pytest.raises(KVWireError, match="expected"):
        asm.adopt([wire[1]], range(0, 1))  # V0's bytes where K0 belongs: another size
    asm.adopt(wire[:3], range(0, 3))
    asm.mark_filled()
    with pytest.raises(KVWireError, match="never filled"):
        asm.finish()
    asm.adopt(wire[3:], range(3, 4))
    assert same_bits(asm.finish(), p)
