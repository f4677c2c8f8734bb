"""Redis discovery against a real redis-server: live workers, TTL expiry, mark_down, Redis outages."""

from __future__ import annotations

import time

import pytest

from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.discovery import RedisWorkerPool
from tests.waiting import wait_for as _wait


@pytest.fixture
def redis_server():
    with RedisServer() as srv:
        yield srv


def _register(url, role, addr, model="m", ttl=1.5):
    reg = WorkerRegistry(url, ttl=ttl)
    reg.register(WorkerRecord(role=role, addr=addr, model=model, capacity_tokens=1000))
    return reg


def test_lists_live_workers_of_its_model(redis_server):
    regs = [
        _register(redis_server.url, "prefill", "p1:1"),
        _register(redis_server.url, "decode", "d1:1"),
        _register(redis_server.url, "prefill", "other:1", model="other"),
    ]
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1)
    try:
        assert [w.addr for w in pool.prefill_workers()] == ["p1:1"]
        assert [w.addr for w in pool.decode_workers()] == ["d1:1"]
    finally:
        pool.close()
        for r in regs:
            r.close()


def test_a_dead_worker_leaves_within_one_ttl(redis_server):
    reg = _register(redis_server.url, "prefill", "p1:1", ttl=1.0)
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1)
    try:
        assert pool.prefill_workers()
        reg._stop.set()  # the worker dies without deregistering: its heartbeat stops
        t0 = time.monotonic()
        assert _wait(lambda: not pool.prefill_workers(), timeout=5)
        assert time.monotonic() - t0 <= 1.0 + 0.5
    finally:
        pool.close()


def test_mark_down_hides_until_a_fresh_heartbeat(redis_server):
    reg = _register(redis_server.url, "decode", "d1:1", ttl=1.2)
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1)
    try:
        pool.mark_down("d1:1")
        assert pool.decode_workers() == []
        assert _wait(lambda: [w.addr for w in pool.decode_workers()] == ["d1:1"], timeout=5)
    finally:
        pool.close()
        reg.close()


def test_redis_down_keeps_the_last_snapshot_and_recovers(redis_server):
    reg = _register(redis_server.url, "prefill", "p1:1", ttl=1.5)
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1)
    try:
        assert pool.prefill_workers()
        port = redis_server.port
        redis_server.stop()
        assert _wait(lambda: not pool.redis_ok, timeout=10)
        assert [w.addr for w in pool.prefill_workers()] == ["p1:1"]  # routes with what it knew
        assert pool.redis_errors >= 1
        with RedisServer(port=port):
            assert _wait(lambda: pool.redis_ok, timeout=10)
            assert _wait(lambda: [w.addr for w in pool.prefill_workers()] == ["p1:1"], timeout=10)
    finally:
        pool.close()
        reg.close()


def test_published_loads_replace_the_snapshot_between_refreshes(redis_server):
    load = {"running": 1, "queued_tokens": 700}
    reg = WorkerRegistry(redis_server.url, ttl=30)
    reg.register(WorkerRecord(role="prefill", addr="p1:1", model="m", capacity_tokens=1000),
                 load_fn=lambda: dict(load))  # fmt: skip
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=30)  # no refresh inside the test
    try:
        assert [r.queued_tokens for r in pool.records("prefill")] == [700]
        time.sleep(0.2)  # the subscriber is listening
        load.update(running=0, queued_tokens=0)
        reg.notify()
        assert _wait(lambda: [r.queued_tokens for r in pool.records("prefill")] == [0], timeout=2)
        assert pool.load_updates >= 1
        held = pool.records("prefill")[0]
        # an older record (a late publish) and one of another model or an unknown worker are ignored
        assert not pool.apply(WorkerRecord(**{**held.__dict__, "queued_tokens": 5, "updated_at": 1.0}))
        assert not pool.apply(WorkerRecord(**{**held.__dict__, "model": "other", "updated_at": 2e9}))
        assert not pool.apply(WorkerRecord(role="prefill", addr="p9:9", model="m", capacity_tokens=1,
                                           updated_at=2e9))  # fmt: skip
        assert [r.addr for r in pool.records("prefill")] == ["p1:1"]
        reg.redis.publish(reg.channel, b"{not json")  # a malformed message is skipped, loads go on
        load["queued_tokens"] = 0
        load["running"] = 0
        load["waiting"] = 2
        reg.notify()
        assert _wait(lambda: [r.waiting for r in pool.records("prefill")] == [2], timeout=2)
    finally:
        pool.close()
        reg.close()


def test_records_redis_lost_are_kept_until_their_ttl_and_written_back(redis_server):
    """A Redis restart loses every key: the router keeps routing to the workers it knew (their
    TTL has not run out), and their next heartbeats write the records back."""
    reg = _register(redis_server.url, "prefill", "p1:1", ttl=6)  # heartbeat every 2 s
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1)
    try:
        assert [w.addr for w in pool.prefill_workers()] == ["p1:1"]
        port = redis_server.port
        redis_server.stop()
        assert _wait(lambda: not pool.redis_ok)
        with RedisServer(port=port) as fresh:  # empty: the record is gone from Redis
            assert _wait(lambda: pool.redis_ok)
            if not WorkerRegistry(fresh.url).list():  # (unless a heartbeat beat us to it)
                time.sleep(0.3)  # refreshes that did not find the key
                assert pool.kept_missing >= 1
            assert [w.addr for w in pool.prefill_workers()] == ["p1:1"]
            assert _wait(lambda: WorkerRegistry(fresh.url).list() != [], timeout=5)  # written back
    finally:
        pool.close()
        reg.close()


def test_a_worker_that_leaves_is_dropped_at_once(redis_server):
    reg = _register(redis_server.url, "decode", "d1:1", ttl=30)
    left: list[str] = []
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=30, on_leave=left.append)  # no refresh
    try:
        assert [w.addr for w in pool.decode_workers()] == ["d1:1"]
        time.sleep(0.2)  # the subscriber is listening
        reg.deregister()
        assert _wait(lambda: pool.decode_workers() == [], timeout=2) and left == ["d1:1"]
        pool.refresh()  # gone from Redis and announced: not kept as "missing"
        assert pool.decode_workers() == []
    finally:
        pool.close()
        reg.close()
