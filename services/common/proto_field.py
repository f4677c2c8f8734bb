"""A message of one length-delimited protobuf field (tag, varint length, bytes), by hand.

The bulk streams (KV chunks, GCache data frames) frame their bytes this way so that a frame costs
one join on the way out and no copy on the way in, where the generated classes would copy the
bytes 2-3 more times. The bytes are those protobuf writes for a message holding only that field,
so the generated classes parse these frames and the other way round (the callers' tests check).

    tag = field_number << 3 | 2     varint(len(data))     data
"""

from __future__ import annotations

from collections.abc import Sequence

Buffer = bytes | bytearray | memoryview
_MAX_VARINT_BYTES = 10  # a 64-bit length


class FieldError(ValueError):
    """A frame whose tag matches but whose length does not describe its bytes."""


def varint(n: int) -> bytes:
    """n >= 0 as a protobuf base-128 varint, low group first."""
    if n < 0:
        raise ValueError(f"varint of a negative number {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_field(tag: int, pieces: Sequence[Buffer]) -> bytes:
    """The frame holding the concatenation of `pieces` (one copy)."""
    size = sum(len(p) for p in pieces)
    return b"".join([bytes((tag,)), varint(size), *pieces])


def field_view(tag: int, raw: bytes) -> memoryview | None:
    """The data of a frame with this tag, as a view of `raw` (no copy); None when `raw` starts
    with another tag; FieldError when the length is unreadable or does not fill `raw` exactly."""
    if not raw or raw[0] != tag:
        return None
    size, shift, pos = 0, 0, 1
    while pos < len(raw) and pos <= _MAX_VARINT_BYTES:
        b = raw[pos]
        size |= (b & 0x7F) << shift
        shift += 7
        pos += 1
        if not b & 0x80:
            if pos + size != len(raw):
                raise FieldError(f"data frame says {size} bytes, holds {len(raw) - pos}")
            return memoryview(raw)[pos:]
    raise FieldError("data frame with a bad length")
