"""The data plane against real node processes: the remote path's bytes, its refusals, a node killed
in the middle of a transfer, frames that are not frames, and nodes without a data plane."""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

import pytest

from services.common.redis_server import RedisServer
from services.gcache import data_conn
from services.gcache.client import GCacheClient
from services.gcache.data_wire import MAGIC, PREFIX, frame_head, read_head
from services.proto_gen import gcache_pb2
from tests.gcache.conftest import NodeFactory, NodeProc, counters, rand_key

MiB = 1 << 20


def client(redis_server: RedisServer, **kw) -> GCacheClient:
    c = GCacheClient(redis_server.url, shm=False, **kw)
    assert c.wait_for_nodes(1)
    return c


def test_random_values_round_trip_and_match_the_grpc_path(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=128 * MiB, disk=False)
    rng = random.Random(3)
    sizes = [0, 1, 100, 64 << 10, MiB - 1, MiB, 4 * MiB + 1, 24 * MiB + 7]  # past gRPC's 4 MiB message
    sizes += [rng.randrange(1, 2 * MiB) for _ in range(20)]
    ref = {rand_key(): os.urandom(n) for n in sizes}
    unknown = [rand_key() for _ in range(3)]
    with client(redis_server) as c, client(redis_server, data_plane=False) as over_grpc:
        assert c.put_many(ref).stored == len(ref)
        got = c.get_many(list(ref) + unknown)
        assert set(got) == set(ref) and all(got[k] == v for k, v in ref.items())
        assert all(v.readonly for v in got.values())
        total = sum(sizes)
        assert c.counters.data_calls == 2 and c.counters.grpc_calls == 0
        assert c.counters.data_bytes == 2 * total and c.counters.gets_missed == 3
        st = counters(node)
        assert st["data_bytes_in"] == total and st["data_bytes_out"] == total
        # both paths read what the other wrote
        again = over_grpc.get_many(list(ref))
        assert all(again[k] == v for k, v in ref.items()) and over_grpc.counters.data_calls == 0
        other = {rand_key(): os.urandom(n) for n in (MiB, 3)}
        assert over_grpc.put_many(other).ok
        assert {k: bytes(v) for k, v in c.get_many(list(other)).items()} == other
    assert 'swaserve_gcache_data_plane_bytes_total{direction="in"}' in node.metrics_text()


def test_refused_values_leave_the_rest_of_the_batch_and_the_connection_usable(
    redis_server, start_node: NodeFactory
):
    start_node(memory_bytes=8 * MiB, disk=False, extra=["--max-value-bytes", "2M"])
    ok1, big, ok2, huge = rand_key(), rand_key(), rand_key(), rand_key()
    batch = [(ok1, os.urandom(MiB)), (big, os.urandom(3 * MiB)), (ok2, b"x"), (huge, os.urandom(9 * MiB))]
    with client(redis_server) as c:
        report = c.put_many(batch)
        assert report.stored == 2 and report.dropped == 0
        assert set(report.errors) == {big, huge} and all("TOO_LARGE" in e for e in report.errors.values())
        got = c.get_many([k for k, _ in batch])
        assert set(got) == {ok1, ok2} and got[ok1] == batch[0][1] and got[ok2] == b"x"
        assert c.counters.node_errors == 0 and c.counters.data_calls == 2


def test_a_node_without_a_data_plane_gets_values_over_grpc(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=32 * MiB, disk=False, extra=["--data-port", "-1"])
    assert node.data_port == -1
    data = {rand_key(): os.urandom(n) for n in (5 * MiB, 10)}
    with client(redis_server) as c:
        assert c.nodes()[node.node_id].data_addr == ""
        assert c.put_many(data).ok
        got = c.get_many(list(data))
        assert all(got[k] == v for k, v in data.items())
        assert c.counters.data_calls == 0 and c.counters.grpc_calls == 2


def test_node_killed_in_the_middle_of_a_put_drops_it_without_raising(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=128 * MiB, disk=False)
    data = [(rand_key(), os.urandom(4 * MiB)) for _ in range(16)]  # far more than socket buffers hold
    with client(redis_server, timeout=20) as c:
        node.proc.send_signal(signal.SIGSTOP)  # the put fills the socket buffers, then blocks
        result: list[object] = []
        t = threading.Thread(target=lambda: result.append(c.put_many(data)))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # still sending
        node.kill()
        t.join(15)
        assert not t.is_alive() and time.monotonic() - t0 < 10  # the kill, not the timeout, ended it
        (report,) = result
        assert report.stored == 0 and report.dropped == len(data)  # type: ignore[attr-defined]
        assert c.counters.node_errors == 1 and c.counters.puts_dropped == len(data)
        assert c.get_many([k for k, _ in data]) == {}  # the dead node: misses, no exception


def test_node_killed_in_the_middle_of_a_get_is_misses(redis_server, start_node: NodeFactory, monkeypatch):
    node = start_node(memory_bytes=128 * MiB, disk=False)
    data = [(rand_key(), os.urandom(4 * MiB)) for _ in range(16)]
    reading, killed = threading.Event(), threading.Event()
    real = data_conn.recv_value

    def slow_reader(sock: socket.socket, buf: memoryview, owed: int) -> None:
        if len(buf) == 4 * MiB and not reading.is_set():  # the first value: pause until the kill
            reading.set()
            assert killed.wait(10)
        real(sock, buf, owed)

    with client(redis_server) as c:
        assert c.put_many(data).ok
        monkeypatch.setattr(data_conn, "recv_value", slow_reader)
        result: list[dict] = []
        t = threading.Thread(target=lambda: result.append(c.get_many([k for k, _ in data])))
        t.start()
        assert reading.wait(10)
        node.kill()
        killed.set()
        t.join(15)
        assert not t.is_alive() and result == [{}]  # the call failed as a whole: every key a miss
        assert c.counters.node_errors == 1 and c.counters.gets_missed == len(data)


def raw_frame(node: NodeProc, payload: bytes) -> tuple[str, bool]:
    """Send `payload` on a new connection; the node's error reply, and whether it closed after it."""
    with socket.create_connection(("127.0.0.1", node.data_port), timeout=10) as s:
        s.sendall(payload)
        head = read_head(s, gcache_pb2.DataReply)
        assert head is not None
        try:
            closed = s.recv(1) == b""
        except ConnectionResetError:  # closed with bytes of ours unread
            closed = True
        return head[0].error, closed


def put_frame(sizes: list[int], data_bytes: int) -> bytes:
    items = [gcache_pb2.PutItem(key=os.urandom(16), size=n) for n in sizes]
    return frame_head(gcache_pb2.DataRequest(put=gcache_pb2.DataPut(items=items)), data_bytes)


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a data plane frame"),
        (PREFIX.pack(MAGIC, 4, 0, 12345) + b"\x0a\x02\x0a\x00", "CRC"),
        (put_frame([10, 10], 30) + b"z" * 30, "add up to 20"),
        (put_frame([-1], 0), "add up to -1"),
        (frame_head(gcache_pb2.DataRequest(), 0), "unknown request"),
        (
            frame_head(
                gcache_pb2.DataRequest(
                    put=gcache_pb2.DataPut(items=[gcache_pb2.PutItem(key=b"k" * 16, size=1, value=b"v")])
                ),
                1,
            )
            + b"v",
            "value follows the header",
        ),
    ],
)
def test_a_corrupt_frame_is_refused_and_the_node_keeps_serving(
    redis_server, start_node: NodeFactory, payload, error
):
    node = start_node(memory_bytes=16 * MiB, disk=False)
    message, closed = raw_frame(node, payload)
    assert error in message and closed
    assert counters(node)["data_rejected_frames"] == 1 and counters(node)["puts"] == 0
    with client(redis_server) as c:
        key = rand_key()
        assert c.put_many([(key, b"v" * 1000)]).ok and c.get_many([key])[key] == b"v" * 1000


def test_a_caller_that_dies_inside_a_value_stores_nothing_of_it(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=16 * MiB, disk=False)
    done, cut = rand_key(), rand_key()
    items = [gcache_pb2.PutItem(key=bytes(done), size=1000), gcache_pb2.PutItem(key=bytes(cut), size=2 * MiB)]
    head = frame_head(gcache_pb2.DataRequest(put=gcache_pb2.DataPut(items=items)), 1000 + 2 * MiB)
    with socket.create_connection(("127.0.0.1", node.data_port), timeout=10) as s:
        s.sendall(head + b"d" * 1000 + b"c" * MiB)  # half of the second value, then gone
    with client(redis_server) as c:
        deadline = time.monotonic() + 5
        while counters(node)["data_connections"] and time.monotonic() < deadline:
            time.sleep(0.05)
        got = c.get_many([done, cut])
        assert set(got) == {done} and got[done] == b"d" * 1000  # values complete before the cut stay
        assert counters(node)["puts"] == 1 and counters(node)["data_rejected_frames"] == 0
