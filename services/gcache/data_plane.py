"""The node's data plane: a TCP listener taking put and get frames (data_wire.py) to the BlockStore.

A thread per connection reads a request frame, answers it, and waits for the next. Outcomes are
the gRPC servicer's: per-key refusals (too large, disk failed) are PutStatus entries, and a value
is stored only once all its bytes arrived (a caller that dies mid-value leaves nothing of it).
A frame that breaks the grammar (bad magic, header CRC, header, sizes that do not add up) gets
DataReply{error} and the connection is closed: after a bad frame the stream cannot be trusted.
"""

from __future__ import annotations

import logging
import socket
import threading

from services.gcache.data_wire import (
    configure,
    discard,
    frame_head,
    read_head,
    recv_value,
    send_buffers,
    value_buffer,
)
from services.gcache.servicer import PutTally, found_items
from services.gcache.store import BlockStore
from services.gcache.wire import WireError
from services.proto_gen import gcache_pb2

log = logging.getLogger(__name__)

SCRATCH_BYTES = 1 << 20
_SCRATCH = bytearray(SCRATCH_BYTES)  # what refused values are read into and dropped (shared: never read)
IDLE_SECONDS = 300.0  # a connection silent this long (between frames or inside one) is closed


class DataPlaneServer:
    def __init__(self, store: BlockStore, host: str, port: int) -> None:
        self.store = store
        self.sock = socket.create_server((host, port), backlog=128)
        self.port: int = self.sock.getsockname()[1]
        self.bytes_in = 0  # value bytes received in puts
        self.bytes_out = 0  # value bytes sent in gets
        self.rejected_frames = 0
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> DataPlaneServer:
        self._thread = threading.Thread(target=self._accept_loop, name="gcache-data-accept", daemon=True)
        self._thread.start()
        return self

    @property
    def connections(self) -> int:
        return len(self._conns)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
            configure(conn, IDLE_SECONDS)
            threading.Thread(target=self._serve, args=(conn, peer), name="gcache-data", daemon=True).start()

    def _serve(self, conn: socket.socket, peer: object) -> None:
        try:
            while True:
                head = read_head(conn, gcache_pb2.DataRequest)
                if head is None:
                    return
                request, data_len = head
                op = request.WhichOneof("op")
                values: list[memoryview] = []
                if op == "put":
                    reply = self._put(conn, request.put, data_len)
                elif op == "get" and data_len == 0:
                    reply, values = self._get(request.get)
                else:
                    raise WireError(f"unknown request {op!r} with {data_len} data bytes")
                send_buffers(conn, [frame_head(reply, sum(len(v) for v in values)), *values])
        except WireError as e:
            with self._lock:
                self.rejected_frames += 1
            log.warning("gcache data plane: refused a frame from %s: %s", peer, e)
            try:
                conn.sendall(frame_head(gcache_pb2.DataReply(error=str(e)), 0))
            except OSError:
                pass
        except OSError as e:  # the caller left (ConnectionError is an OSError) or the server closed
            log.debug("gcache data plane: connection from %s ended: %s", peer, e)
        except Exception:  # a bug: end this connection (the caller sees a failed call), not the node
            log.exception("gcache data plane: connection from %s failed", peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _put(self, conn: socket.socket, put: gcache_pb2.DataPut, data_len: int) -> gcache_pb2.DataReply:
        """Read each value into its own buffer and store it; refused values are read and dropped."""
        sizes = [item.size for item in put.items]
        if any(n < 0 for n in sizes) or sum(sizes) != data_len:
            raise WireError(f"item sizes add up to {sum(sizes)}, the frame carries {data_len} data bytes")
        if any(item.WhichOneof("place") for item in put.items):
            raise WireError("a data plane item's value follows the header (no shm_offset, no value)")
        statuses, tally = [], PutTally(put.migration)
        owed = data_len  # what the caller still sends in this frame
        for item in put.items:
            key = bytes(item.key)
            outcome = self.store.check_put(key, item.size)
            if outcome is not None:
                discard(conn, item.size, _SCRATCH)
                statuses.append(tally.status(outcome, item.size, received=False))
            else:
                value = value_buffer(item.size)
                recv_value(conn, value, owed)
                statuses.append(tally.status(self.store.put(key, value), item.size, received=True))
            owed -= item.size
        with self._lock:
            self.bytes_in += tally.received
        return gcache_pb2.DataReply(put=tally.reply(self.store, statuses))

    def _get(self, get: gcache_pb2.DataGet) -> tuple[gcache_pb2.DataReply, list[memoryview]]:
        items, values = [], []
        for item, value in found_items(self.store, get.keys):
            items.append(item)
            values.append(value)
        with self._lock:
            self.bytes_out += sum(len(v) for v in values)
        return gcache_pb2.DataReply(get=gcache_pb2.GetItems(items=items)), values

    def close(self) -> None:
        """Stop accepting and end every connection (a call in flight fails on the caller's side)."""
        with self._lock:
            self._closed = True
            conns = list(self._conns)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)
