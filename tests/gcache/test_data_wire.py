"""Data plane frames and socket helpers over a real socket pair: gathered sends arrive whole and in
order, prefixes and headers are checked, a peer closing mid-frame is an error."""

from __future__ import annotations

import os
import socket
import struct
import threading
import zlib

import pytest

from services.gcache.data_wire import (
    IOV_MAX,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    frame_head,
    read_head,
    recv_exact,
    send_buffers,
)
from services.gcache.wire import WireError
from services.proto_gen import gcache_pb2


def read_all(sock: socket.socket, n: int, out: list[bytes]) -> None:
    buf = bytearray(n)
    recv_exact(sock, buf)
    out.append(bytes(buf))


@pytest.mark.parametrize(
    "sizes",
    [
        [0, 1, 5, 0],
        [1 << 20] * 8,  # more than the socket buffers hold: partial sends
        [7] * (IOV_MAX * 2 + 3),  # more buffers than one sendmsg takes
        [3 << 20, 1, 1 << 20, 0, 12345],
    ],
)
def test_send_buffers_delivers_every_byte_in_order(sizes):
    parts = [os.urandom(n) for n in sizes]
    a, b = socket.socketpair()
    with a, b:
        got: list[bytes] = []
        reader = threading.Thread(target=read_all, args=(b, sum(sizes), got))
        reader.start()
        send_buffers(a, [parts[0], bytearray(parts[1]), *map(memoryview, parts[2:])])  # any buffer type
        reader.join(10)
        assert got == [b"".join(parts)]


def test_a_frame_head_reads_back():
    request = gcache_pb2.DataRequest(
        put=gcache_pb2.DataPut(sender="me", items=[gcache_pb2.PutItem(key=b"k" * 16, size=3)])
    )
    a, b = socket.socketpair()
    with a, b:
        send_buffers(a, [frame_head(request, 3), b"xyz"])
        head = read_head(b, gcache_pb2.DataRequest)
        assert head is not None and head == (request, 3)
        rest = bytearray(3)
        recv_exact(b, rest)
        assert rest == b"xyz"
        a.close()
        assert read_head(b, gcache_pb2.DataRequest) is None  # a clean close between frames


def prefix(header: bytes, data: int = 0, magic: bytes = MAGIC, crc: int | None = None) -> bytes:
    return PREFIX.pack(magic, len(header), data, zlib.crc32(header) if crc is None else crc) + header


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (prefix(b"", magic=b"HTTP"), "not a data plane frame"),
        (PREFIX.pack(MAGIC, MAX_HEADER_BYTES + 1, 0, 0), "exceeds"),
        (prefix(b"\x0a\x02\x0a\x00", crc=1), "CRC"),
        (prefix(b"\xff\xff\xff"), "bad frame header"),
    ],
)
def test_bad_frames_raise(raw, message):
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        with pytest.raises(WireError, match=message):
            read_head(b, gcache_pb2.DataRequest)


def test_a_peer_closing_inside_a_frame_is_a_connection_error():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("<4sI", MAGIC, 10))  # half a prefix
        a.close()
        with pytest.raises(ConnectionError):
            read_head(b, gcache_pb2.DataRequest)
