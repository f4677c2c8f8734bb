"""Frames of the data plane: value bytes over a plain TCP connection, beside the gRPC control API.

    frame   "GCD1" | header length u32 | data length u64 | CRC-32 of the header u32   (20 bytes, LE)
            | header: DataRequest or DataReply (proto/gcache.proto) | data: values, in item order

A connection carries one request at a time: the caller writes a request frame, the node answers
with one reply frame. Put: DataRequest{put: items (key, size)} + the values -> DataReply{put:
PutReply}. Get: DataRequest{get: keys} -> DataReply{get: found items (index, size, tier)} + their
values. A frame the node cannot accept gets DataReply{error} and the connection is closed.

Bytes move without copies in Python: the sender hands the header and the values' own buffers to
`sendmsg` (gather), the receiver `recv_into`s each value's final buffer. The kernel copies once
each way, as for any socket; gRPC Python adds 2-3 copies per message on top (docs/gcache.md).
Value bytes carry no checksum of ours (TCP's, as on the gRPC path); the header's CRC catches a
frame that is not one (a stray client, a desynchronised stream) before its sizes are trusted.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from services.gcache.wire import Buffer, WireError
from services.proto_gen import gcache_pb2

MAGIC = b"GCD1"
PREFIX = struct.Struct("<4sIQI")  # magic, header length, data length, CRC-32 of the header
MAX_HEADER_BYTES = 64 << 20  # ~2M items; a bigger header is refused before it is read
M = TypeVar("M", gcache_pb2.DataRequest, gcache_pb2.DataReply)
LOWAT_BYTES = 256 << 10  # recv_value: wake the receiver per this many bytes, not per segment
IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


def frame_head(header: gcache_pb2.DataRequest | gcache_pb2.DataReply, data_bytes: int) -> bytes:
    """The prefix and the header of a frame whose data is `data_bytes` long."""
    raw = header.SerializeToString()
    return PREFIX.pack(MAGIC, len(raw), data_bytes, zlib.crc32(raw)) + raw


def parse_prefix(raw: Buffer) -> tuple[int, int, int]:
    """(header length, data length, header CRC) of a frame prefix, or WireError."""
    magic, header_len, data_len, crc = PREFIX.unpack(raw)
    if magic != MAGIC:
        raise WireError(f"not a data plane frame (starts with {bytes(magic)!r})")
    if header_len > MAX_HEADER_BYTES:
        raise WireError(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    return header_len, data_len, crc


def check_header(raw: Buffer, crc: int) -> None:
    if zlib.crc32(raw) != crc:
        raise WireError("frame header fails its CRC")


def configure(sock: socket.socket, timeout: float | None = None) -> None:
    """No Nagle delay on the small frames; a blocking socket, so one sendmsg moves a whole batch
    inside the kernel (Python's own timeouts make the socket non-blocking: a poll and a partial
    send per socket buffer's worth; puts were slower in 4 of 6 interleaved A/B runs). `timeout`
    (seconds) is the kernel's, per send or receive call; an expired one raises BlockingIOError
    (EAGAIN). Socket buffers stay autotuned: fixing them (4 or 16 MiB) measured 2-5% slower."""
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if timeout:
        tv = struct.pack("ll", int(timeout), int(timeout % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)


def value_buffer(size: int) -> memoryview:
    """A writable buffer for a value about to be received: uninitialised (numpy.empty), as every
    byte is overwritten; bytearray's zero-filling cost ~7% of a put."""
    return np.empty(size, dtype=np.uint8).data


def send_buffers(sock: socket.socket, buffers: Sequence[Buffer]) -> None:
    """Write every buffer, in order, with gathered sendmsg calls (no joining, no copies here)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i : i + IOV_MAX])
        while sent:  # skip what went out; a partial write leaves the rest of a view at i
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0


def recv_exact(sock: socket.socket, buf: bytearray | memoryview) -> None:
    """Fill `buf` from the socket; ConnectionError if the peer closes first."""
    view = memoryview(buf).cast("B")
    got, size = 0, len(view)
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if not n:
            raise ConnectionError(f"peer closed the connection {size - got} bytes before the end of a frame")
        got += n


def recv_value(sock: socket.socket, buf: memoryview, owed: int) -> None:
    """recv_exact for a value's bytes, `owed` being what the peer still sends in this frame from
    here on (this value and the ones after it). The reader is woken once up to LOWAT_BYTES have
    arrived rather than for every segment (SO_RCVLOWAT), and the mark goes back to 1 afterwards,
    for the header reads that follow.

    The kernel wakes a reader when the bytes it has not copied yet reach the mark, but a recv call
    first copies what is there: with `x` bytes copied at once and still short of the mark, it waits
    for `mark` new bytes. So the mark is at most half of what the frame still owes: x < mark <=
    owed / 2 leaves more than `mark` bytes to come, and the wake-up always comes (a mark of all
    that is owed would hang on the frame's tail). Loopback puts ran 0-26% faster with it in six
    interleaved A/B runs (1 and 4 MiB values), the node spending up to a third less CPU."""
    view = memoryview(buf).cast("B")
    got, size, lowat = 0, len(view), 1
    if size < LOWAT_BYTES:  # a few segments: not worth two setsockopt calls
        recv_exact(sock, view)
        return
    try:
        while got < size:
            want = max(1, min(LOWAT_BYTES, (owed - got) // 2))
            if want != lowat:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                lowat = want
            n = sock.recv_into(view[got:], size - got)
            if not n:
                raise ConnectionError(
                    f"peer closed the connection {size - got} bytes before the end of a value"
                )
            got += n
    finally:
        if lowat != 1:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
            except OSError:
                pass  # the socket is going away anyway


def discard(sock: socket.socket, size: int, scratch: bytearray) -> None:
    """Read and drop `size` bytes (a value the receiver refused)."""
    view = memoryview(scratch)
    while size:
        n = min(size, len(view))
        recv_exact(sock, view[:n])
        size -= n


def read_head(sock: socket.socket, message: type[M]) -> tuple[M, int] | None:
    """The next frame's header and data length; None if the peer closed cleanly between frames."""
    prefix = bytearray(PREFIX.size)
    n = sock.recv_into(prefix)
    if not n:
        return None
    recv_exact(sock, memoryview(prefix)[n:])
    header_len, data_len, crc = parse_prefix(prefix)
    raw = bytearray(header_len)
    recv_exact(sock, raw)
    check_header(raw, crc)
    try:
        return message.FromString(bytes(raw)), data_len
    except Exception as e:  # protobuf's DecodeError differs between implementations
        raise WireError(f"bad frame header: {e}") from e
