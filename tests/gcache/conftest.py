"""Fixtures: a real redis-server, and GCache nodes as real processes (`python -m services.gcache.main`)."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from services.common.redis_server import RedisServer
from services.gcache.conn import NodeConn
from services.gcache.keys import BlockKey
from services.proto_gen import gcache_pb2

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


class NodeProc:
    """One node process; its output is collected in `lines` (read by a thread, so pipes never fill)."""

    def __init__(self, redis_url: str, disk_dir: Path | None, memory_bytes: int = 64 << 20,
                 disk_bytes: int = 256 << 20, extra: Sequence[str] = (), fsize_limit: int | None = None,
                 port: int = 0) -> None:  # fmt: skip
        cmd = [
            sys.executable, "-m", "services.gcache.main",
            "--host", "127.0.0.1", "--advertise-host", "127.0.0.1", "--port", str(port),
            "--redis-url", redis_url, "--memory-bytes", str(memory_bytes), "--metrics-port", "0",
            "--heartbeat-ttl", "2", "--drain-grace", "1.5", "--log-level", "INFO",
        ]  # fmt: skip
        if disk_dir is not None:
            cmd += ["--disk-dir", str(disk_dir), "--disk-bytes", str(disk_bytes)]
        cmd += list(extra)

        def limit_file_size() -> None:  # a real EFBIG for every write past the limit
            assert fsize_limit is not None
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))

        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            preexec_fn=limit_file_size if fsize_limit is not None else None,
        )  # fmt: skip
        self.lines: list[str] = []
        ready = threading.Event()
        self.node_id = self.addr = ""
        self.metrics_port = self.data_port = 0

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("GCACHE_READY"):
                    _, self.node_id, self.addr, metrics, data = line.split()
                    self.metrics_port = int(metrics.split("=")[1])
                    self.data_port = int(data.split("=")[1])
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + 20
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("gcache node did not start:\n" + "".join(self.lines))

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def stats(self) -> gcache_pb2.StatsReply:
        conn = NodeConn(self.addr, timeout=10)
        try:
            return conn.stats()
        finally:
            conn.close()

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def wait(self, timeout: float = 20) -> int:
        return self.proc.wait(timeout)

    def output(self) -> str:
        return "".join(self.lines)


NodeFactory = Callable[..., NodeProc]


@pytest.fixture
def start_node(redis_server: RedisServer, tmp_path: Path) -> Iterator[NodeFactory]:
    """start_node(name="n0", disk=True, **NodeProc options) -> NodeProc; every node is killed at the end."""
    nodes: list[NodeProc] = []

    def start(name: str = "n0", disk: bool = True, **kw: object) -> NodeProc:
        node = NodeProc(redis_server.url, tmp_path / name if disk else None, **kw)  # type: ignore[arg-type]
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.kill()


def rand_key() -> BlockKey:
    return BlockKey(os.urandom(16))


def counters(node: NodeProc) -> dict[str, int]:
    return dict(node.stats().counters)
