"""Data plane frames and socket helpers over a real socket pair: gathered sends arrive whole and in
order, prefixes and headers are checked, a peer closing mid-frame is an error."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import zlib

import pytest

from services.gcache.data_wire import (
    IOV_MAX,
    LOWAT_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    PREFIX,
    frame_head,
    read_head,
    recv_exact,
    recv_value,
    send_buffers,
    value_buffer,
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


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))  # a hang fails the test
    return a, b


@pytest.mark.parametrize("size", [1, LOWAT_BYTES - 1, LOWAT_BYTES, LOWAT_BYTES + 1, (1 << 20) + 3, 4 << 20])
def test_recv_value_gets_every_byte_and_leaves_small_reads_working(size):
    """The value's last bytes come late, fewer than the wake-up mark, and nothing follows them until
    we answer: recv_value must not wait for bytes that are not coming, and a short read after it
    must return."""
    value, tail = os.urandom(size), os.urandom(20)
    cut = max(0, size - 1000)

    def send() -> None:
        a.sendall(value[:cut])
        time.sleep(0.2)  # the reader is asleep in recv by now, owed fewer bytes than LOWAT_BYTES
        a.sendall(value[cut:])
        a.recv(1)
        a.sendall(tail)

    a, b = tcp_pair()
    with a, b:
        sender = threading.Thread(target=send)
        sender.start()
        buf = value_buffer(size)
        t0 = time.monotonic()
        recv_value(b, buf, size)
        assert time.monotonic() - t0 < 3  # not stuck until SO_RCVTIMEO (5 s) gave up waiting
        assert bytes(buf) == value
        assert b.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        b.sendall(b"k")
        got = bytearray(20)
        recv_exact(b, got)
        assert got == tail
        sender.join(5)


def test_recv_value_raises_when_the_peer_closes_inside_the_value():
    a, b = tcp_pair()
    with a, b:
        a.sendall(os.urandom(LOWAT_BYTES + 5))
        a.close()
        with pytest.raises(ConnectionError):
            recv_value(b, value_buffer(2 * LOWAT_BYTES), 2 * LOWAT_BYTES)


def test_recv_value_across_a_frame_of_several_values_with_a_late_tail():
    sizes = [3 * LOWAT_BYTES + 7, LOWAT_BYTES // 3, 2 * LOWAT_BYTES]
    values = [os.urandom(n) for n in sizes]
    frame = b"".join(values)

    def send() -> None:
        a.sendall(frame[:-1000])
        time.sleep(0.2)
        a.sendall(frame[-1000:])

    a, b = tcp_pair()
    with a, b:
        sender = threading.Thread(target=send)
        sender.start()
        owed, t0 = len(frame), time.monotonic()
        for n, v in zip(sizes, values, strict=True):
            buf = value_buffer(n)
            recv_value(b, buf, owed)
            assert bytes(buf) == v
            owed -= n
        assert time.monotonic() - t0 < 3  # no wait for bytes that were not coming
        sender.join(5)
