"""Load changes reach Redis at once (notify), not a heartbeat later, against a real redis-server:
the record is rewritten and published on the load channel; idle is written immediately, busy
changes at most every min_gap; nothing is written while the load stays the same."""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis

from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry

REC = WorkerRecord(role="prefill", addr="127.0.0.1:5100", model="m", capacity_tokens=4096)


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def _stored(r: redis.Redis, reg: WorkerRegistry) -> dict:
    return json.loads(r.get(reg.key("prefill", REC.addr)))


def test_notify_writes_and_publishes_the_new_load_long_before_the_heartbeat(redis_server):
    load = {"running": 1, "waiting": 0, "queued_tokens": 300}
    reg = WorkerRegistry(redis_server.url, ttl=30)  # heartbeat every 10 s: far outside this test
    r = redis.Redis.from_url(redis_server.url)
    sub = r.pubsub(ignore_subscribe_messages=True)
    sub.subscribe(reg.channel)
    try:
        reg.register(REC, load_fn=lambda: dict(load))
        assert _stored(r, reg)["queued_tokens"] == 300
        load.update(running=0, queued_tokens=0)
        time.sleep(0.3)
        assert _stored(r, reg)["queued_tokens"] == 300, "written without a notify: the test proves nothing"
        reg.notify()
        assert _wait(lambda: _stored(r, reg)["queued_tokens"] == 0, timeout=2)
        published: list[dict] = []

        def heard_idle() -> bool:
            msg = sub.get_message(timeout=0.05)
            if msg:
                published.append(json.loads(msg["data"]))
            return bool(published) and published[-1]["queued_tokens"] == 0

        assert _wait(heard_idle, timeout=2)  # registration (300), then the notify (0)
        assert [p["queued_tokens"] for p in published] == [300, 0]
        assert published[-1]["worker_id"] == REC.addr
    finally:
        sub.close()
        reg.close()


def test_idle_is_written_at_once_busy_changes_wait_for_the_gap(redis_server):
    load = {"running": 1, "queued_tokens": 500}
    reg = WorkerRegistry(redis_server.url, ttl=30, min_gap=1.0)
    r = redis.Redis.from_url(redis_server.url)
    try:
        reg.register(REC, load_fn=lambda: dict(load))
        w0 = reg.writes
        load["queued_tokens"] = 400  # busy -> busy, inside the gap: deferred
        reg.notify()
        time.sleep(0.3)
        assert _stored(r, reg)["queued_tokens"] == 500 and reg.writes == w0
        assert _wait(lambda: _stored(r, reg)["queued_tokens"] == 400, timeout=3)  # after the gap
        load.update(running=0, queued_tokens=0)  # busy -> idle, right after a write: at once
        reg.notify()
        assert _wait(lambda: _stored(r, reg)["queued_tokens"] == 0, timeout=0.5)
    finally:
        reg.close()


def test_a_storm_of_notifies_writes_only_changes_and_at_most_every_gap(redis_server):
    load = {"running": 1, "queued_tokens": 1000}
    reg = WorkerRegistry(redis_server.url, ttl=30, min_gap=0.1)
    try:
        reg.register(REC, load_fn=lambda: dict(load))
        w0 = reg.writes
        for _ in range(200):  # same load: nothing to write
            reg.notify()
            time.sleep(0.002)
        assert reg.writes == w0
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                load["queued_tokens"] -= 1
                reg.notify()
                time.sleep(0.001)

        t = threading.Thread(target=busy)
        started = time.monotonic()
        t.start()
        time.sleep(1.0)
        stop.set()
        t.join()
        elapsed = time.monotonic() - started
        assert 3 <= reg.writes - w0 <= elapsed / 0.1 + 2
    finally:
        reg.close()


def test_a_heartbeat_still_runs_when_nobody_notifies(redis_server):
    reg = WorkerRegistry(redis_server.url, ttl=0.6)
    r = redis.Redis.from_url(redis_server.url)
    try:
        reg.register(REC)
        first = _stored(r, reg)["updated_at"]
        assert _wait(lambda: _stored(r, reg)["updated_at"] > first, timeout=2)
        time.sleep(1.0)  # several TTLs: kept alive
        assert r.get(reg.key("prefill", REC.addr)) is not None
    finally:
        reg.close()
