"""The routing pipeline inside the HTTP router, against FAKE gRPC workers (fake_workers.py) and, where
Redis is involved, a real redis-server: the uncached estimate on the wire, routing metrics, retry on
another worker, two replicas agreeing, Redis restarted under load."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.block_hash import hash_blocks
from services.common.prompt_wire import prompt_ids_of
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.app import create_app
from services.router.discovery import RedisWorkerPool
from services.router.policy import PolicyConfig
from services.router.workers import StaticWorkerPool, WorkerPool
from tests.router.conftest import MODEL, RouterServer, router_settings
from tests.router.fake_index import FakeIndexSource, FakePrefixIndex
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel
from tests.waiting import wait_for as _wait

PAGE = 16
POLICY = PolicyConfig(page_size=PAGE, window=32)


@pytest.fixture
def workers(toy: ToyModel) -> Iterator[tuple[list[FakePrefillWorker], FakeDecodeWorker]]:
    prefills = [FakePrefillWorker(toy).start() for _ in range(3)]
    decode = FakeDecodeWorker(toy).start()
    yield prefills, decode
    for w in prefills:
        w.stop()
    decode.stop()


def serve(model_dir: Path, pool: WorkerPool, source: FakeIndexSource | None, **kw: object) -> RouterServer:
    settings = router_settings(model_dir, policy=POLICY, **kw)
    return RouterServer(create_app(settings, pool, index=source))


def ids(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


class Status(int):
    """An HTTP status that shows the body when an assertion on it fails."""

    body: str = ""

    def __repr__(self) -> str:
        return f"{int(self)} ({self.body[:300]})"


def complete(router: RouterServer, prompt: list[int]) -> int:
    with router.http() as h:
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3})
    status = Status(r.status_code)
    status.body = r.text
    return status


def served_by(prefills: list[FakePrefillWorker], prompt: list[int]) -> list[int]:
    return [i for i, w in enumerate(prefills) if any(prompt_ids_of(r) == prompt for r in w.requests)]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_the_holder_gets_the_request(model_dir: Path, workers) -> None:
    prefills, decode = workers
    source = FakeIndexSource(FakePrefixIndex(PAGE, 32))
    pool = StaticWorkerPool([w.addr for w in prefills], [decode.addr])
    hit, miss = ids(100), ids(70, start=5000)
    source.index.store(prefills[1].addr, hash_blocks(hit, PAGE))  # 6 full pages: 96 tokens
    router = serve(model_dir, pool, source)
    try:
        assert complete(router, hit) == 200
        assert complete(router, miss) == 200
        with router.http() as h:
            text = h.get("/metrics").text
    finally:
        router.close()
    assert served_by(prefills, hit) == [1]
    assert metric(text, 'swaserve_router_decisions_total{reason="cache_hit"}') == 1
    assert metric(text, 'swaserve_router_decisions_total{reason="cache_miss"}') == 1
    assert metric(text, 'swaserve_router_match_fraction_count{kind="safe"}') == 2
    assert metric(text, 'swaserve_router_match_tokens_total{kind="safe"}') == 96
    assert metric(text, "swaserve_router_routing_seconds_count") == 2
    assert metric(text, "swaserve_router_index_usable") == 1
    assert metric(text, "swaserve_router_redis_errors_total") == 0
    assert metric(text, 'swaserve_router_bucket_decisions_total{bucket="short",fallback="0"}') == 2


def test_a_failing_worker_is_avoided_on_the_retry_and_a_dead_one_marked_down(
    model_dir: Path, workers
) -> None:
    prefills, decode = workers
    nowhere = "127.0.0.1:1"  # nothing listens: Prefill and Health both fail
    source = FakeIndexSource(FakePrefixIndex(PAGE, 32))
    failing, dead_pick, healthy = ids(64), ids(64, start=3000), prefills[2]
    source.index.store(prefills[0].addr, hash_blocks(failing, PAGE))
    source.index.store(healthy.addr, hash_blocks(failing[:32], PAGE))  # the retry's best: not `nowhere`
    source.index.store(nowhere, hash_blocks(dead_pick, PAGE))
    prefills[0].fail_with = grpc.StatusCode.UNAVAILABLE  # alive (answers Health), fails Prefill
    pool = StaticWorkerPool([prefills[0].addr, nowhere, healthy.addr], [decode.addr], down_seconds=60)
    router = serve(model_dir, pool, source)
    try:
        assert complete(router, failing) == 200  # retried on another worker
        prefills[0].fail_with = None
        assert complete(router, dead_pick) == 200
        # the Health probe that marks a worker down runs in the background: poll for its verdict
        assert _wait(lambda: nowhere not in [w.addr for w in pool.prefill_workers()])  # marked down
        assert prefills[0].addr in [w.addr for w in pool.prefill_workers()]  # alive: not marked down
        with router.http() as h:
            text = h.get("/metrics").text
    finally:
        router.close()
    assert served_by(prefills, failing) == [0, 2]  # the retry did not go back to the failing worker
    assert len(prefills[0].requests) + len(prefills[2].requests) == 3 and not prefills[1].requests
    assert metric(text, "swaserve_router_retries_total") == 2
    assert metric(text, 'swaserve_router_marked_down_total{role="prefill"}') == 1


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


def _register(url: str, role: str, addr: str, load: dict[str, int]) -> WorkerRegistry:
    reg = WorkerRegistry(url, ttl=3.0)
    reg.register(
        WorkerRecord(role=role, addr=addr, model=MODEL, capacity_tokens=10_000), load_fn=lambda: load
    )
    return reg


def test_two_router_replicas_send_each_request_to_the_same_worker(
    model_dir: Path, workers, redis_server: RedisServer
) -> None:
    prefills, decode = workers
    url = redis_server.url
    regs = [_register(url, "prefill", w.addr, {"free_kv_tokens": 10_000}) for w in prefills]
    regs.append(_register(url, "decode", decode.addr, {"free_kv_tokens": 10_000}))
    source = FakeIndexSource(FakePrefixIndex(PAGE, 32))  # the same "Redis" index state for both
    pools = [RedisWorkerPool(url, model=MODEL, refresh_s=0.1) for _ in range(2)]
    routers = [serve(model_dir, pool, source) for pool in pools]
    prompts = [ids(40 + 3 * i, start=100 * i + 7) for i in range(12)]
    try:
        for pool in pools:
            assert _wait(lambda pool=pool: len(pool.prefill_workers()) == 3)  # type: ignore[misc]
        assert [complete(routers[0], p) for p in prompts] == [200] * 12
        first = [served_by(prefills, p) for p in prompts]
        assert [complete(routers[1], p) for p in prompts] == [200] * 12
        both = [served_by(prefills, p) for p in prompts]
    finally:
        for r in routers:
            r.close()
        for p in pools:
            p.close()
        for reg in regs:
            reg.close()
    assert all(len(f) == 1 for f in first)
    assert both == first  # replica B chose the worker replica A chose, for every prompt
    assert len({f[0] for f in first}) >= 2  # and the prompts did spread over the workers


def test_redis_restarted_under_load_costs_no_request(
    model_dir: Path, workers, redis_server: RedisServer
) -> None:
    prefills, decode = workers
    url, port = redis_server.url, redis_server.port
    regs = [_register(url, "prefill", w.addr, {"free_kv_tokens": 10_000}) for w in prefills[:2]]
    regs.append(_register(url, "decode", decode.addr, {"free_kv_tokens": 10_000}))
    pool = RedisWorkerPool(url, model=MODEL, refresh_s=0.1)
    router = serve(model_dir, pool, None)
    try:
        assert _wait(lambda: len(pool.prefill_workers()) == 2)
        statuses = [complete(router, ids(30, start=i)) for i in range(3)]
        redis_server.stop()
        assert _wait(lambda: not pool.redis_ok)
        statuses += [complete(router, ids(30, start=100 + i)) for i in range(5)]
        with router.http() as h:
            down = h.get("/metrics").text
        with RedisServer(port=port):  # empty: until the heartbeats write back, records are kept
            assert _wait(lambda: pool.redis_ok, timeout=15)
            statuses += [complete(router, ids(30, start=200 + i)) for i in range(3)]
            with router.http() as h:
                up = h.get("/metrics").text
    finally:
        router.close()
        pool.close()
        for reg in regs:
            reg.close()
    assert statuses == [200] * 11
    assert (
        metric(down, "swaserve_router_redis_up") == 0
        and metric(down, "swaserve_router_redis_errors_total") >= 1
    )
    assert metric(up, "swaserve_router_redis_up") == 1
    assert metric(up, 'swaserve_router_workers{role="prefill"}') == 2
    assert metric(up, 'swaserve_router_decisions_total{reason="no_index"}') == 11


def test_without_a_prefill_worker_the_reservation_made_meanwhile_is_given_back(
    model_dir: Path, workers
) -> None:
    _, decode = workers  # Reserve leaves before the prefill choice (dispatch.py); that choice fails here
    router = serve(model_dir, StaticWorkerPool([], [decode.addr]), None)
    try:
        status = complete(router, ids(40))
    finally:
        router.close()
    assert status == 503 and "no prefill worker is available" in status.body
    assert _wait(lambda: len(decode.aborted) == 1)  # the Reserve it got was released
    assert decode.reserved == {}
