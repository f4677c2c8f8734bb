"""KV transports between real processes: this pytest process sends, a receiver subprocess (this
file run as a script) installs nothing but records a digest of every payload it accepted.

    python tests/common/test_kv_transports.py serve LOG [PORT [zero_copy]]   receiver; prints its port
    python tests/common/test_kv_transports.py send ADDR TRANSPORT SEED...   another sender
    python tests/common/test_kv_transports.py orphan         writes shm segments, then dies by SIGKILL
    python tests/common/test_kv_transports.py loop ADDR TRANSPORT   sends big payloads until killed
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from services.common.kv_transport import GRPC_OPTIONS, KVTransferError, add_kv_receiver, make_sender
from services.common.kv_transport.shm import SHM_DIR, split_sizes, write_segments
from services.common.kv_wire import chunk_stream, encode_data_chunk, header_from_meta, payload_views
from services.proto_gen import kv_pb2, kv_pb2_grpc
from tests.common.test_kv_wire import FULL, SWA, mimo_meta, payload_digest, random_payload

ROOT = Path(__file__).resolve().parents[2]
TRANSPORTS = ["grpc", "shm", "torch"]
PATHS = ["grpc", "shm", "shm-zero-copy", "torch"]  # transport, and for shm how the receiver reads
REFUSAL = "decode pools are full"


# ---- the other processes -----------------------------------------------------------------------


def serve(log: str, port: int = 0, zero_copy: bool = False) -> None:
    lock = threading.Lock()

    def on_payload(p) -> None:  # type: ignore[no-untyped-def]
        if p.meta.rid.startswith("refuse"):
            raise RuntimeError(REFUSAL)
        line = json.dumps({"rid": p.meta.rid, "digest": payload_digest(p), "nbytes": p.nbytes})
        with lock, open(log, "a") as f:
            f.write(line + "\n")

    server = grpc.server(futures.ThreadPoolExecutor(8), options=GRPC_OPTIONS)
    add_kv_receiver(server, on_payload, shm={"sweep_interval": 0.0, "zero_copy": zero_copy})
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def send_main(addr: str, transport: str, seeds: list[int]) -> None:
    with make_sender(transport, timeout=30.0) as sender:
        for seed in seeds:
            p = random_payload(mimo_meta(60 + seed * 50, rid=f"other-{transport}-{seed}"), seed)
            sender.send(addr, p)
            print(json.dumps({"rid": p.meta.rid, "digest": payload_digest(p)}), flush=True)


def loop_main(addr: str, transport: str) -> None:
    with make_sender(transport, timeout=30.0) as sender:
        for i in range(1000):
            p = random_payload(mimo_meta(6000, "float32", rid=f"killed-{i}", layers=(FULL, SWA) * 4), i % 2)
            print(json.dumps({"rid": p.meta.rid, "digest": payload_digest(p)}), flush=True)
            sender.send(addr, p)


def orphan_main() -> None:
    payload = random_payload(mimo_meta(3000, "float32", layers=(FULL, SWA) * 2), 0)  # > 16 MiB: 2 segments
    print(" ".join(p.name for p in write_segments(payload, writers=2)), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def spawn(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )


# ---- fixtures ----------------------------------------------------------------------------------


class Receiver:
    def __init__(self, addr: str, log: Path) -> None:
        self.addr, self.log = addr, log

    def accepted(self) -> dict[str, str]:
        if not self.log.exists():
            return {}
        return {d["rid"]: d["digest"] for d in map(json.loads, self.log.read_text().splitlines())}


def start_receiver(log: Path, *mode: str) -> tuple[subprocess.Popen[str], Receiver]:
    proc = spawn("serve", str(log), "0", *mode)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, Receiver(f"127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def receivers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("kv")
    copy, zero_copy = start_receiver(logs / "copy.jsonl"), start_receiver(logs / "zc.jsonl", "zero_copy")
    yield {"copy": copy[1], "zero_copy": zero_copy[1]}
    for proc, _ in (copy, zero_copy):
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def receiver(receivers):
    return receivers["copy"]


def route(path: str, receivers, senders):  # type: ignore[no-untyped-def]
    """(receiver, sender) of a PATHS entry."""
    if path == "shm-zero-copy":
        return receivers["zero_copy"], senders["shm"]
    return receivers["copy"], senders[path]


@pytest.fixture(scope="module")
def senders():
    made = {name: make_sender(name, timeout=30.0, connect_timeout=5.0) for name in TRANSPORTS}
    yield made
    for s in made.values():
        s.close()


def my_segments() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith(f"swaserve-kv-{os.getpid()}-")}


def send_and_check(receiver: Receiver, sender, payload) -> None:  # type: ignore[no-untyped-def]
    result = sender.send(receiver.addr, payload)
    assert result.nbytes == payload.nbytes == payload.meta.nbytes and result.seconds > 0
    assert receiver.accepted()[payload.meta.rid] == payload_digest(payload)  # bit for bit
    assert my_segments() == set()


# ---- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("n", [0, 50, 300])  # empty, shorter and longer than the window (128)
def test_round_trip_bit_exact(receivers, senders, path, dtype, n):
    receiver, sender = route(path, receivers, senders)
    meta = mimo_meta(n, dtype, rid=f"rt-{path}-{dtype}-{n}")
    send_and_check(receiver, sender, random_payload(meta, seed=n))


@pytest.mark.parametrize("path", PATHS)
def test_transfer_larger_than_64_mib(receivers, senders, path):
    receiver, sender = route(path, receivers, senders)
    meta = mimo_meta(3600, "float32", rid=f"big-{path}", layers=(FULL, SWA) * 4)
    payload = random_payload(meta, seed=7)
    assert payload.nbytes > 64 << 20
    send_and_check(receiver, sender, payload)


@pytest.mark.parametrize("path", PATHS)
def test_refusal_reaches_the_sender_and_nothing_is_held(receivers, senders, path):
    receiver, sender = route(path, receivers, senders)
    payload = random_payload(mimo_meta(3600, "float32", rid=f"refuse-{path}", layers=(FULL, SWA) * 2), seed=3)
    with pytest.raises(KVTransferError, match=f"refused .*{REFUSAL}"):
        sender.send(receiver.addr, payload)
    assert payload.meta.rid not in receiver.accepted()
    assert my_segments() == set()
    # the sender (torch: the same process group) still works afterwards
    send_and_check(receiver, sender, random_payload(mimo_meta(200, rid=f"after-{path}"), seed=4))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unreachable_address_fails_fast(transport):
    payload = random_payload(mimo_meta(10), 0)
    with make_sender(transport, connect_timeout=10.0) as sender:
        t0 = time.monotonic()
        with pytest.raises(KVTransferError, match="unreachable"):
            sender.send(f"127.0.0.1:{_closed_port()}", payload)
        assert time.monotonic() - t0 < 3.0  # refused: no need to wait for the connect timeout
    assert my_segments() == set()


def test_silent_address_fails_at_the_connect_deadline():
    with socket.socket() as mute:  # accepts TCP, never speaks HTTP/2
        mute.bind(("127.0.0.1", 0))
        mute.listen()
        with make_sender("grpc", connect_timeout=1.0) as sender:
            t0 = time.monotonic()
            with pytest.raises(KVTransferError, match="no answer within 1s"):
                sender.send(f"127.0.0.1:{mute.getsockname()[1]}", random_payload(mimo_meta(10), 0))
            assert 0.9 < time.monotonic() - t0 < 3.0


def _raw_push(receiver: Receiver, chunks: list[bytes]) -> kv_pb2.KVAck:
    with grpc.insecure_channel(receiver.addr, options=GRPC_OPTIONS) as ch:
        push = ch.stream_unary("/swaserve.kv.KVTransfer/Push", response_deserializer=kv_pb2.KVAck.FromString)
        ack: kv_pb2.KVAck = push(iter(chunks), timeout=10)
        return ack


def test_truncated_and_oversized_streams_are_refused(receiver):
    for rid, cut in (("trunc", -1), ("over", None)):
        p = random_payload(mimo_meta(200, rid=rid), 5)
        chunks = list(chunk_stream(header_from_meta(p.meta, "grpc"), p, 64 << 10))
        chunks = chunks[:cut] if cut else [*chunks, encode_data_chunk([memoryview(b"extra")])]
        ack = _raw_push(receiver, chunks)
        assert not ack.ok and ("truncated" if cut else "oversized") in ack.error
        assert rid not in receiver.accepted()
    header = header_from_meta(mimo_meta(1, rid="pigeon"), "pigeon")
    ack = _raw_push(receiver, [kv_pb2.KVChunk(header=header).SerializeToString()])
    assert not ack.ok and "unknown KV transport 'pigeon'" in ack.error


def test_generated_stub_interoperates(receiver):
    p = random_payload(mimo_meta(150, "float32", rid="stub"), 6)
    messages = [kv_pb2.KVChunk(header=header_from_meta(p.meta, "grpc"))]
    messages += [kv_pb2.KVChunk(data=bytes(v)) for v in payload_views(p)]
    with grpc.insecure_channel(receiver.addr, options=GRPC_OPTIONS) as ch:
        ack = kv_pb2_grpc.KVTransferStub(ch).Push(iter(messages), timeout=10)
    assert ack.ok and ack.bytes_received == p.nbytes
    assert receiver.accepted()["stub"] == payload_digest(p)


def test_shm_segment_of_a_dead_sender_is_swept(receiver, senders):
    proc = spawn("orphan")
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert proc.wait(30) == -signal.SIGKILL
    assert len(names) == 2 and all((SHM_DIR / n).exists() for n in names)  # the dead sender left them
    send_and_check(receiver, senders["shm"], random_payload(mimo_meta(30, rid="sweeper"), 8))
    assert not any((SHM_DIR / n).exists() for n in names)  # the receiver swept them


def test_torch_several_senders_one_receiver(receiver, senders):
    other = spawn("send", receiver.addr, "torch", "1", "2", "3")
    mine: dict[str, str] = {}
    end = time.monotonic() + 30
    while other.poll() is None and time.monotonic() < end or len(mine) < 3:  # while the other one sends
        p = random_payload(mimo_meta(100 + len(mine) % 50, rid=f"mine-{len(mine)}"), len(mine))
        senders["torch"].send(receiver.addr, p)
        mine[p.meta.rid] = payload_digest(p)
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0
    theirs = [json.loads(line) for line in out.splitlines()]
    accepted = receiver.accepted()
    assert len(theirs) == 3 and all(accepted[d["rid"]] == d["digest"] for d in theirs)
    assert all(accepted[rid] == digest for rid, digest in mine.items())


def test_torch_pair_is_rebuilt_after_the_receiver_restarts(tmp_path):
    port = _closed_port()
    log = tmp_path / "accepted.jsonl"
    rx = Receiver(f"127.0.0.1:{port}", log)
    with make_sender("torch", timeout=20.0) as sender:
        for life in range(2):
            proc = spawn("serve", str(log), str(port))
            assert proc.stdout is not None and int(proc.stdout.readline()) == port
            try:
                if life == 1:  # the new process does not know the old pair: refused, then rebuilt
                    with pytest.raises(KVTransferError, match="unknown torch pair"):
                        sender.send(rx.addr, random_payload(mimo_meta(40, rid="stale"), 1))
                for i in range(2):
                    send_and_check(rx, sender, random_payload(mimo_meta(40, rid=f"life{life}-{i}"), i))
            finally:
                proc.kill()
                proc.wait(10)
        with pytest.raises(KVTransferError, match="torch transfer of 'dead' .*failed"):
            sender.send(rx.addr, random_payload(mimo_meta(40, rid="dead"), 1))


def test_torch_sender_killed_mid_transfer(receiver, senders):
    child = spawn("loop", receiver.addr, "torch")
    assert child.stdout is not None
    started = [json.loads(child.stdout.readline()) for _ in range(2)]  # the second transfer began
    time.sleep(0.05)
    child.kill()
    child.wait(10)
    accepted = receiver.accepted()
    assert started[0]["rid"] in accepted  # the first one completed, the second is anywhere
    assert all(accepted[d["rid"]] == d["digest"] for d in started if d["rid"] in accepted)  # never partial
    t0 = time.monotonic()
    send_and_check(receiver, senders["torch"], random_payload(mimo_meta(64, rid="after-kill"), 9))
    assert time.monotonic() - t0 < 5.0


@pytest.mark.parametrize(
    "sizes, parts, expected",
    [
        ([10, 10, 10, 10], 2, [(0, 2), (2, 4)]),
        ([50, 1, 1, 1], 2, [(0, 1), (1, 4)]),
        ([5], 4, [(0, 1)]),
        ([1, 1, 1], 8, [(0, 1), (1, 2), (2, 3)]),
        ([0, 0], 2, [(0, 2)]),
        ([], 2, [(0, 0)]),
    ],
)
def test_shm_split_is_contiguous_and_balanced(sizes, parts, expected):
    assert [(r.start, r.stop) for r in split_sizes(sizes, parts)] == expected


def test_unknown_transport_name():
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'; known: grpc, shm, torch"):
        make_sender("rdma")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    if cmd == "serve":
        serve(rest[0], int(rest[1]) if len(rest) > 1 else 0, rest[2:] == ["zero_copy"])
    elif cmd == "send":
        send_main(rest[0], rest[1], [int(s) for s in rest[2:]])
    elif cmd == "loop":
        loop_main(rest[0], rest[1])
    elif cmd == "orphan":
        orphan_main()
