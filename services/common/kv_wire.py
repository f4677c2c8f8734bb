"""KV payload <-> proto/kv.proto messages: the header, and the payload's bytes in a fixed order.

Byte order of a payload (every transport uses it, grpc as chunks, shm as one file, torch as sends):

    layer 0 K | layer 0 V | layer 1 K | layer 1 V | ... | layer L-1 V      total = KVMeta.nbytes

each tensor as its raw row-major bytes (native endianness), so no element is ever converted.

Copies. The sender reads the payload tensors in place (`tensor_bytes`: a memoryview over the
tensor's storage, any dtype via a uint8 view) and the receiver writes into the final tensors in
place (`PayloadAssembler`). Data chunks are framed by hand (services/common/proto_field.py),
byte-identical to protobuf's encoding of `KVChunk{data}` (tag 0x12, varint length, bytes), so a
chunk costs one join on the way out and one copy into the tensor on the way in, where the generated
classes would copy the bytes 2-3 more times. Headers go through the generated classes. Anything either way parses with `KVChunk`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

from services.common.kv_payload import KVMeta, KVPayload
from services.common.kv_spec import DTYPE_ITEMSIZE, KV_KINDS, KVLayerSpec, kv_kind, torch_dtype
from services.common.proto_field import FieldError, encode_field, field_view
from services.proto_gen import kv_pb2

CHUNK_BYTES = 1 << 20  # data bytes per grpc chunk (FACTS.md: 1 MiB streams 4-8x faster than one message)
_DATA_TAG = 0x12  # field 2 (KVChunk.data), wire type 2 (length-delimited)


class KVWireError(ValueError):
    """A header or byte stream that does not describe a valid payload (never half-installed)."""


# ---- header ------------------------------------------------------------------------------------


def header_from_meta(meta: KVMeta, transport: str) -> kv_pb2.KVHeader:
    """The header of a transfer; the transport fills in its rendezvous (`header.shm`, `header.torch`)."""
    layers = [kv_pb2.LayerHeader(kind=m.kind, kv_heads=m.kv_heads, k_dim=m.k_dim, v_dim=m.v_dim) for m in meta.layers]
    return kv_pb2.KVHeader(
        rid=meta.rid,
        num_tokens=meta.num_tokens,
        window=meta.window,
        dtype=meta.dtype,
        layers=layers,
        transport=transport,
        total_bytes=meta.nbytes,
    )


def meta_from_header(header: kv_pb2.KVHeader) -> KVMeta:
    """Validated KVMeta of a header: known dtype and kinds, positive dims, total_bytes consistent."""
    if header.dtype not in DTYPE_ITEMSIZE:
        raise KVWireError(f"header of {header.rid!r}: unknown dtype {header.dtype!r}")
    if header.num_tokens < 0 or header.window < 0:
        raise KVWireError(f"header of {header.rid!r}: negative num_tokens or window")
    layers = []
    for i, h in enumerate(header.layers):
        if h.kind not in KV_KINDS or min(h.kv_heads, h.k_dim, h.v_dim) <= 0:
            raise KVWireError(f"header of {header.rid!r}: bad layer {i}: {h.kind!r} {h.kv_heads}x({h.k_dim}+{h.v_dim})")
        layers.append(KVLayerSpec(kv_kind(h.kind), h.kv_heads, h.k_dim, h.v_dim))
    meta = KVMeta(header.rid, header.num_tokens, header.window, header.dtype, tuple(layers))
    if header.total_bytes != meta.nbytes:
        raise KVWireError(f"header of {header.rid!r}: total_bytes {header.total_bytes} but geometry gives {meta.nbytes}")
    return meta


# ---- tensors as bytes --------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable, flat byte view of a contiguous CPU tensor's storage (no copy; bf16 included)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise KVWireError(f"need a contiguous CPU tensor, got {t.device} contiguous={t.is_contiguous()}")
    return t.reshape(-1).view(torch.uint8).numpy().data


def payload_tensors(payload: KVPayload) -> list[torch.Tensor]:
    """The payload's tensors in wire order: K0, V0, K1, V1, ..."""
    return [t for pair in zip(payload.k, payload.v, strict=True) for t in pair]


def payload_views(payload: KVPayload) -> list[memoryview]:
    return [tensor_bytes(t) for t in payload_tensors(payload)]


def iter_pieces(views: list[memoryview], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list[memoryview]]:
    """Cut the concatenation of `views` into chunks of `chunk_bytes` (the last one shorter), each
    chunk a list of slices (no copy). Chunks span tensor boundaries, so small SWA tensors do not
    make small messages. Empty views yield nothing; an empty payload yields no chunk."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    pieces: list[memoryview] = []
    room = chunk_bytes
    for v in views:
        off = 0
        while off < len(v):
            take = min(room, len(v) - off)
            pieces.append(v[off : off + take])
            off += take
            room -= take
            if room == 0:
                yield pieces
                pieces, room = [], chunk_bytes
    if pieces:
        yield pieces


# ---- chunks ------------------------------------------------------------------------------------


def encode_header_chunk(header: kv_pb2.KVHeader) -> bytes:
    return kv_pb2.KVChunk(header=header).SerializeToString()


def encode_data_chunk(pieces: list[memoryview]) -> bytes:
    """Serialized `KVChunk{data = concatenation of pieces}`, in one copy."""
    return encode_field(_DATA_TAG, pieces)


def decode_chunk(raw: bytes) -> kv_pb2.KVHeader | memoryview:
    """A serialized KVChunk -> its header, or a view of its data (no copy on the fast path)."""
    try:
        data = field_view(_DATA_TAG, raw)
    except FieldError:
        data = None  # the generated parser below names what is wrong
    if data is not None:
        return data
    try:
        chunk = kv_pb2.KVChunk.FromString(raw)
    except Exception as exc:  # protobuf's DecodeError type differs between implementations
        raise KVWireError(f"undecodable KV chunk: {exc}") from exc
    body = chunk.WhichOneof("body")
    if body == "header":
        return chunk.header
    if body == "data":
        return memoryview(chunk.data)
    raise KVWireError("empty KV chunk (neither header nor data)")


def chunk_stream(header: kv_pb2.KVHeader, payload: KVPayload, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The whole grpc stream of a payload: the header chunk, then the data chunks."""
    yield encode_header_chunk(header)
    for pieces in iter_pieces(payload_views(payload), chunk_bytes):
        yield encode_data_chunk(pieces)


# ---- receiving ---------------------------------------------------------------------------------


class PayloadAssembler:
    """Fills freshly allocated tensors of a KVMeta with the bytes of a stream, in wire order.

    Nothing becomes a KVPayload until `finish()` has checked that exactly `meta.nbytes` arrived:
    an oversized stream fails on the write that overflows, a truncated one in finish().
    `allocate=False`: the caller supplies the tensors as byte views instead (`adopt`)."""

    def __init__(self, meta: KVMeta, allocate: bool = True) -> None:
        self.meta = meta
        self.dtype = torch_dtype(meta.dtype)
        self.shapes = [s for i in range(len(meta.layers)) for s in (meta.k_shape(i), meta.v_shape(i))]
        self.sizes = [math.prod(s) * meta.itemsize for s in self.shapes]  # bytes, wire order
        self.tensors: list[torch.Tensor | None] = (
            [torch.empty(s, dtype=self.dtype) for s in self.shapes] if allocate else [None] * len(self.shapes)
        )
        self.views = [tensor_bytes(t) for t in self.tensors if t is not None]
        self.received = 0
        self._tensor = 0  # index of the tensor being filled, and bytes of it filled so far
        self._offset = 0

    def allocated(self) -> list[torch.Tensor]:
        """The tensors to fill, in wire order (allocate=True)."""
        return [t for t in self.tensors if t is not None]

    def adopt(self, byte_tensors: list[torch.Tensor], indices: range) -> None:
        """Use flat uint8 tensors (e.g. over a mapping) as the tensors `indices`, in wire order."""
        for i, b in zip(indices, byte_tensors, strict=True):
            if b.numel() != self.sizes[i]:
                raise KVWireError(f"tensor {i} of {self.meta.rid!r}: {b.numel()} bytes, expected {self.sizes[i]}")
            self.tensors[i] = b.view(self.dtype).reshape(self.shapes[i])

    def write(self, data: memoryview | bytes) -> None:
        data = memoryview(data)
        if self.received + len(data) > self.meta.nbytes:
            raise KVWireError(
                f"KV stream of {self.meta.rid!r} oversized: more than the {self.meta.nbytes} bytes of its header"
            )
        pos = 0
        while pos < len(data):
            while self._offset == len(self.views[self._tensor]):  # skip filled (or empty) tensors
                self._tensor += 1
                self._offset = 0
            dst = self.views[self._tensor]
            take = min(len(data) - pos, len(dst) - self._offset)
            dst[self._offset : self._offset + take] = data[pos : pos + take]
            self._offset += take
            pos += take
        self.received += len(data)

    def mark_filled(self) -> None:
        """The tensors were filled out of band (shm read, torch recv): count them as received."""
        self.received = self.meta.nbytes

    def finish(self) -> KVPayload:
        if self.received != self.meta.nbytes:
            raise KVWireError(
                f"KV stream of {self.meta.rid!r} truncated: {self.received} of {self.meta.nbytes} bytes"
            )
        tensors = []
        for t, shape, size in zip(self.tensors, self.shapes, self.sizes, strict=True):
            if t is None and size:
                raise KVWireError(f"KV of {self.meta.rid!r}: a tensor of {shape} was never filled")
            tensors.append(torch.empty(shape, dtype=self.dtype) if t is None else t)
        return KVPayload(self.meta, tensors[0::2], tensors[1::2])


def assemble(meta: KVMeta, data_chunks: Iterable[bytes]) -> KVPayload:
    """Data chunks (serialized KVChunk) of a payload whose header was already read -> the payload."""
    asm = PayloadAssembler(meta)
    for raw in data_chunks:
        item = decode_chunk(raw)
        if isinstance(item, kv_pb2.KVHeader):
            raise KVWireError(f"KV stream of {meta.rid!r}: a second header")
        asm.write(item)
    return asm.finish()
