"""WorkerRegistry against a real redis-server: register, list, TTL expiry, deregister, Redis restart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.redis_server import RedisNotInstalled, RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from tests.waiting import wait_for


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def record(role: str = "prefill", port: int = 5000, model: str = "mimo-tiny") -> WorkerRecord:
    return WorkerRecord(role=role, addr=f"127.0.0.1:{port}", model=model, capacity_tokens=4096)


def test_register_list_and_filters(redis_server):
    a, b, c = (WorkerRegistry(redis_server.url, ttl=3) for _ in range(3))
    reader = WorkerRegistry(redis_server.url)
    try:
        a.register(
            record("prefill", 5001), load_fn=lambda: {"running": 2, "waiting": 1, "free_kv_tokens": 900}
        )
        b.register(record("decode", 5002))
        c.register(record("decode", 5003, model="smollm2"))
        all_ = reader.list()
        assert [(r.role, r.addr) for r in all_] == [
            ("decode", "127.0.0.1:5002"),
            ("decode", "127.0.0.1:5003"),
            ("prefill", "127.0.0.1:5001"),
        ]
        (pre,) = reader.list("prefill")
        assert (pre.running, pre.waiting, pre.free_kv_tokens, pre.capacity_tokens) == (2, 1, 900, 4096)
        assert pre.worker_id == pre.addr and pre.started_at > 0 and pre.updated_at >= pre.started_at
        assert [r.addr for r in reader.list("decode", model="smollm2")] == ["127.0.0.1:5003"]
    finally:
        for reg in (a, b, c, reader):
            reg.close()


def test_heartbeat_refreshes_load_and_outlives_the_ttl(redis_server):
    load = {"running": 0}
    reg = WorkerRegistry(redis_server.url, ttl=0.6)
    reader = WorkerRegistry(redis_server.url)
    try:
        reg.register(record(), load_fn=lambda: dict(load))
        load["running"] = 7
        assert wait_for(lambda: [r.running for r in reader.list()] == [7], timeout=2)
        time.sleep(1.5)  # more than two TTLs: alive only because the heartbeat refreshes it
        assert len(reader.list()) == 1
    finally:
        reg.close()
        reader.close()


def test_deregister_removes_at_once(redis_server):
    reg = WorkerRegistry(redis_server.url, ttl=30)
    reader = WorkerRegistry(redis_server.url)
    reg.register(record())
    assert len(reader.list()) == 1
    reg.deregister()
    assert reader.list() == []
    reader.close()


def test_a_killed_worker_is_gone_within_one_ttl(redis_server):
    script = (
        "import time\n"
        "from services.common.registry import WorkerRecord, WorkerRegistry\n"
        f"r = WorkerRegistry({redis_server.url!r}, ttl=1.0)\n"
        "r.register(WorkerRecord(role='decode', addr='127.0.0.1:6000', model='m', capacity_tokens=1))\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    reader = WorkerRegistry(redis_server.url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"up"
        assert len(reader.list("decode")) == 1
        proc.kill()
        killed = time.monotonic()
        assert wait_for(lambda: reader.list("decode") == [], timeout=3)
        assert time.monotonic() - killed <= 1.0 + 0.5  # one TTL (plus polling and scheduling slack)
    finally:
        proc.kill()
        proc.wait()
        reader.close()


def test_heartbeat_survives_a_redis_restart(redis_server):
    reg = WorkerRegistry(redis_server.url, ttl=0.6)
    reader = WorkerRegistry(redis_server.url)
    try:
        reg.register(record())
        redis_server.stop()
        assert wait_for(lambda: not reg.healthy, timeout=5)  # logged and retried, not raised
        redis_server.start()  # same port, empty
        assert wait_for(lambda: len(reader.list()) == 1, timeout=5)
        assert reg.healthy
    finally:
        reg.close()
        reader.close()


def test_missing_redis_server_binary_says_how_to_fix():
    with pytest.raises(RedisNotInstalled, match="make setup"):
        RedisServer(executable="redis-server-that-does-not-exist").start()


@pytest.mark.parametrize("bad", [{"role": ""}, {"role": "a:b"}, {"addr": ""}, {"model": ""}])
def test_invalid_records_are_refused(bad):
    fields = {"role": "prefill", "addr": "h:1", "model": "m", "capacity_tokens": 1} | bad
    with pytest.raises(ValueError):
        WorkerRecord(**fields)
