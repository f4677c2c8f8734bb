"""One node's data plane, caller side: puts and gets as frames over pooled TCP connections.

Same results and errors as NodeConn (conn.py), so callers treat both alike: a node that cannot be
reached, closes mid-frame or times out is NodeError(UNAVAILABLE / DEADLINE_EXCEEDED) -> marked
down, its keys dropped or missed; a frame the node refused is NodeError(INVALID_ARGUMENT).
A connection serves one call at a time; idle ones are kept for the next call (threads that call
at once get one each). A call that fails with a connection error on a kept connection is tried
once more on a new one: the node may have restarted since (puts and gets are idempotent).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

import grpc

from services.gcache.conn import GetResult, NodeError, PutResult, put_outcomes
from services.gcache.data_wire import configure, frame_head, read_head, recv_value, send_buffers, value_buffer
from services.gcache.wire import Buffer, WireError
from services.proto_gen import gcache_pb2

MAX_IDLE = 4  # kept connections per node
STRIPES = 2  # connections one big put is spread over
STRIPE_BYTES = 8 << 20  # a put is split only if every run gets at least this many bytes
T = TypeVar("T")


class DataConn:
    def __init__(self, addr: str, timeout: float = 30.0, stripes: int = STRIPES) -> None:
        self.addr = addr
        self.timeout = timeout
        host, port = addr.rsplit(":", 1)
        self._target = (host.strip("[]"), int(port))
        self.stripes = stripes
        self._pool = ThreadPoolExecutor(max(1, stripes - 1), thread_name_prefix="gcache-data")
        self._idle: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- calls -----------------------------------------------------------------------------------
    def put(
        self, items: Sequence[tuple[bytes, Buffer]], migration: bool = False, sender: str = ""
    ) -> PutResult:
        """Store items; one status per item, in order. A big batch of distinct keys is split into
        `stripes` runs of items sent on as many connections at once (the node receives them on as
        many threads): loopback puts ran 1.05-1.44x faster on two connections than on one."""
        runs = _runs([len(v) for _, v in items], self.stripes)
        if len(runs) == 1 or len({bytes(k) for k, _ in items}) < len(items):  # a repeated key: last wins
            return self._put(items, migration, sender)
        parts = self._parallel([partial(self._put, items[r.start : r.stop], migration, sender) for r in runs])
        return PutResult(
            [st for p in parts for st in p.statuses], 0, 0, data_bytes=sum(p.data_bytes for p in parts)
        )

    def _parallel(self, calls: list[Callable[[], T]]) -> list[T]:
        """Run the calls at once (the first on this thread); any failure fails them all, as one call."""
        futures = [self._pool.submit(c) for c in calls[1:]]
        first = calls[0]()
        return [first, *(f.result() for f in futures)]

    def _put(self, items: Sequence[tuple[bytes, Buffer]], migration: bool, sender: str) -> PutResult:
        request = gcache_pb2.DataRequest(
            put=gcache_pb2.DataPut(
                migration=migration, sender=sender,
                items=[gcache_pb2.PutItem(key=bytes(k), size=len(v)) for k, v in items],
            )
        )  # fmt: skip
        sizes = [len(v) for _, v in items]
        head = frame_head(request, sum(sizes))

        def call(sock: socket.socket) -> gcache_pb2.PutReply:
            send_buffers(sock, [head, *(v for _, v in items)])
            reply, data_len = self._reply(sock, "put")
            if data_len:
                raise WireError("a put reply with data")
            return reply.put

        statuses = put_outcomes(self.addr, self._run(call), len(items))
        return PutResult(statuses, shm_bytes=0, grpc_bytes=0, data_bytes=sum(sizes))

    def get(self, keys: Sequence[bytes]) -> GetResult:
        """The values found, by index into `keys`, each in its own buffer (read-only views). (Not
        striped: split over two connections, gets of 1 and 4 MiB values ran no faster, bound by
        the page faults of fresh buffers in this process.)"""
        head = frame_head(gcache_pb2.DataRequest(get=gcache_pb2.DataGet(keys=[bytes(k) for k in keys])), 0)

        def call(sock: socket.socket) -> dict[int, memoryview]:
            send_buffers(sock, [head])
            reply, data_len = self._reply(sock, "get")
            items = reply.get.items
            if sum(it.size for it in items) != data_len or any(it.size < 0 for it in items):
                raise WireError(f"found sizes add up to {sum(it.size for it in items)}, data is {data_len}")
            values: dict[int, memoryview] = {}
            owed = data_len  # what the node still sends in this frame
            for it in items:
                if it.index >= len(keys):
                    raise WireError(f"item index {it.index} beyond {len(keys)} keys")
                buf = value_buffer(it.size)
                recv_value(sock, buf, owed)
                values[it.index] = buf.toreadonly()
                owed -= it.size
            return values

        values = self._run(call)
        return GetResult(values, shm_bytes=0, grpc_bytes=0, data_bytes=sum(len(v) for v in values.values()))

    def _reply(self, sock: socket.socket, op: str) -> tuple[gcache_pb2.DataReply, int]:
        head = read_head(sock, gcache_pb2.DataReply)
        if head is None:
            raise ConnectionError("the node closed the connection")
        reply, data_len = head
        if reply.error:
            raise NodeError(self.addr, grpc.StatusCode.INVALID_ARGUMENT, f"data plane: {reply.error}")
        if reply.WhichOneof("body") != op:
            raise WireError(f"a {reply.WhichOneof('body')} reply to a {op}")
        return reply, data_len

    # -- connections -----------------------------------------------------------------------------
    def _run(self, call: Callable[[socket.socket], T]) -> T:
        """`call` on a kept connection (once more on a new one if the kept one fails) or a new one;
        every failure as NodeError, and the connection closed."""
        sock, kept = self._checkout()
        try:
            try:
                result = call(sock)
            except ConnectionError:
                if not kept:
                    raise
                sock.close()
                sock = self._connect()
                result = call(sock)
        except Exception as e:
            sock.close()
            raise self._error(e) from e
        self._checkin(sock)
        return result

    def _error(self, e: Exception) -> Exception:
        if isinstance(e, NodeError):
            return e
        if isinstance(e, TimeoutError | BlockingIOError):  # BlockingIOError: SO_RCVTIMEO / SO_SNDTIMEO
            return NodeError(self.addr, grpc.StatusCode.DEADLINE_EXCEEDED, f"data plane: {e}")
        if isinstance(e, WireError):
            return NodeError(self.addr, None, f"data plane: bad reply: {e}")
        if isinstance(e, OSError):
            return NodeError(self.addr, grpc.StatusCode.UNAVAILABLE, f"data plane: {e}")
        return e

    def _checkout(self) -> tuple[socket.socket, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self._target, timeout=self.timeout)
        except TimeoutError as e:
            raise NodeError(self.addr, grpc.StatusCode.DEADLINE_EXCEEDED, f"data plane connect: {e}") from e
        except OSError as e:
            raise NodeError(self.addr, grpc.StatusCode.UNAVAILABLE, f"data plane connect: {e}") from e
        configure(sock, self.timeout)
        return sock

    def _checkin(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < MAX_IDLE:
                self._idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for sock in idle:
            sock.close()
        self._pool.shutdown(wait=False)


def _runs(sizes: list[int], stripes: int) -> list[range]:
    """Split items into at most `stripes` consecutive runs of about equal bytes, each run about
    STRIPE_BYTES or more (one run for less than 2 * STRIPE_BYTES)."""
    total = sum(sizes)
    n = max(1, min(stripes, len(sizes), total // STRIPE_BYTES))
    if n == 1:
        return [range(len(sizes))]
    runs: list[range] = []
    start = acc = 0
    for i, size in enumerate(sizes):
        acc += size
        if len(runs) < n - 1 and acc * n >= total * (len(runs) + 1) and i + 1 < len(sizes):
            runs.append(range(start, i + 1))
            start = i + 1
    runs.append(range(start, len(sizes)))
    return runs
