"""Routing-time residency and fencing through a real redis-server (services/router/residency.py,
services/common/kv_index_follower.py): replica A records a decision, replica B's follower matches
it; the worker's events replace it; it expires; a failure withdraws it; deregistration drops it;
a follower started later rebuilds it. Fencing: a restart under the same id (the old process died
without a word), a cache reset while idle, events of the old incarnation arriving late. Redis down:
nothing is written, and nothing pending survives the outage."""

from __future__ import annotations

import array
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest

from services.common.block_hash import ROOT_HASH, BlockHash, hash_blocks
from services.common.kv_event_bus import KVEventPublisher
from services.common.kv_events import AllCleared, BlockStored
from services.common.kv_index_follower import KVIndexFollower
from services.common.pending_wire import pack_hashes
from services.common.prefix_index import WorkerMatch
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.discovery import RedisWorkerPool
from services.router.policy import Candidate, PolicyConfig
from services.router.residency import RoutedResidency, whole_pages_packed
from services.router.routing import RoutingPipeline
from tests.waiting import wait_for

PAGE, WINDOW = 16, 32  # need = 2 pages
POLICY = PolicyConfig(page_size=PAGE, window=WINDOW, pending_ttl_base_s=30.0, pending_ttl_max_s=60.0)
MODEL = "m"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


@pytest.fixture
def followers(redis_server: RedisServer) -> Iterator[list[KVIndexFollower]]:
    fs = [KVIndexFollower(redis_server.url, PAGE, WINDOW, block_ms=50).start() for _ in range(2)]
    yield fs
    for f in fs:
        f.close()


def stored(kind: str, hashes: tuple[BlockHash, ...]) -> BlockStored:
    """A BlockStored event as the publisher reads it (kind and hashes; the tokens do not travel)."""
    return BlockStored(kind, tuple(hashes), ROOT_HASH, (0,) * (len(hashes) * PAGE), PAGE)  # type: ignore[arg-type]


def publisher(url: str, worker: str, page: int, window: int, **kw: object) -> KVEventPublisher:
    """A worker's publisher whose first publish (a resync of its empty cache) is already written."""
    pub = KVEventPublisher(url, worker, page, window, **kw)  # type: ignore[arg-type]
    pub.publish([])
    assert pub.flush()
    return pub


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def cand(worker: str, incarnation: str = "", queued: int = 0) -> Candidate:
    return Candidate(worker, f"addr-{worker}", queued_tokens=queued, has_load=True, incarnation=incarnation,
                     capacity_tokens=100_000, free_kv_tokens=100_000)  # fmt: skip


def route(pipe: RoutingPipeline, ids: list[int], workers: list[Candidate]):  # noqa: ANN201
    p = pipe.prepare(ids)
    return p, pipe.decide(p, workers, [cand("decode")])


def safe(f: KVIndexFollower, ids: list[int], worker: str) -> int:
    hashes = hash_blocks(ids, PAGE)[: (len(ids) - 1) // PAGE]
    return f.index.match(hashes, [worker])[worker].safe_blocks


def test_a_decision_is_seen_by_another_replica_and_replaced_by_the_workers_events(
    redis_server: RedisServer, followers: list[KVIndexFollower]
) -> None:
    a, b = followers
    res = RoutedResidency(POLICY, a.index, redis_server.url)
    pipe = RoutingPipeline(POLICY, a)
    ids = prompt(200)  # 12 whole pages, usable 12 ((200 - 1) // 16)
    p, d = route(pipe, ids, [cand("w1"), cand("w2")])
    entry = res.record("rid-1", d, p)
    assert entry is not None and len(entry.full) == 12
    worker = d.prefill.worker_id
    assert safe(a, ids + [7] * 40, worker) == 12  # this replica: at once
    assert res.flush() and wait_for(lambda: safe(b, ids + [7] * 40, worker) == 12)  # the other: by the stream
    assert safe(b, ids + [7] * 40, "w1" if worker == "w2" else "w2") == 0
    # a sibling sharing 8 pages: raw match on the worker, no SWA at the branch: not window-safe
    sib = hash_blocks(ids[:128] + [5] * 100, PAGE)
    assert b.index.match(sib, [worker])[worker] == WorkerMatch(8, 0)
    # the worker's own events arrive: the entry is replaced (gone from both replicas), the match stays
    pub = publisher(redis_server.url, worker, PAGE, WINDOW)
    try:
        pub.publish([stored("full", tuple(entry.full)), stored("swa", tuple(entry.full[-2:]))])
        assert pub.flush()
        assert wait_for(lambda: "rid-1" not in a.index.pending and "rid-1" not in b.index.pending)
        assert safe(b, ids + [7] * 40, worker) == 12
        assert b.index.pending.replaced >= 1
    finally:
        pub.close()
        res.close()


def test_expired_withdrawn_forgotten_and_rebuilt_by_a_later_follower(
    redis_server: RedisServer, followers: list[KVIndexFollower]
) -> None:
    a, b = followers
    short = replace(POLICY, pending_ttl_base_s=0.6, pending_ttl_factor=0.0, pending_ttl_max_s=0.6)
    res_short = RoutedResidency(short, a.index, redis_server.url)
    res = RoutedResidency(POLICY, a.index, redis_server.url)
    pipe = RoutingPipeline(POLICY, a)
    try:
        ids1, ids2, ids3 = prompt(100), prompt(100, 5000), prompt(100, 9000)
        p1, d1 = route(pipe, ids1, [cand("w1")])
        res_short.record("short", d1, p1)
        p2, d2 = route(pipe, ids2, [cand("w1")])
        res.record("failed", d2, p2)
        p3, d3 = route(pipe, ids3, [cand("w2")])
        res.record("kept", d3, p3)
        assert res.flush() and res_short.flush()
        assert wait_for(lambda: len(b.index.pending) == 3)
        # a follower started now rebuilds them from the stream
        c = KVIndexFollower(redis_server.url, PAGE, WINDOW, block_ms=50).start()
        try:
            assert {e.pid for e in c.index.pending.entries()} == {"short", "failed", "kept"}
            res.drop("failed", "w1")  # the Prefill failed: withdrawn everywhere
            assert res.flush()
            assert wait_for(lambda: "failed" not in b.index.pending and "failed" not in c.index.pending)
            assert "failed" not in a.index.pending
            # the short one expires (its TTL from the stream entry's time)
            assert wait_for(
                lambda: safe(b, ids1 + [1] * 20, "w1") == 0 and safe(c, ids1 + [1] * 20, "w1") == 0
            )
            assert safe(b, ids3 + [1] * 20, "w2") == 6
            # w2 leaves the registry: its pending entries go with it
            b.forget_worker("w2")
            assert safe(b, ids3 + [1] * 20, "w2") == 0 and "kept" not in b.index.pending
        finally:
            c.close()
    finally:
        res.close()
        res_short.close()


def test_a_restart_under_the_same_id_is_fenced_within_a_heartbeat(redis_server: RedisServer) -> None:
    """The old process dies without a word (its keys stay until their TTL); the new one registers
    with a new start id: the router credits nothing of the old one, pending entries routed to the
    old one included, and its late events are ignored; the new process's events count."""
    url = redis_server.url
    follower = KVIndexFollower(url, PAGE, WINDOW, block_ms=50).start()
    pool = RedisWorkerPool(
        url, model=MODEL, refresh_s=0.2, on_record=lambda r: follower.fence(r.worker_id, r.start_id)
    )
    res = RoutedResidency(POLICY, follower.index, url)
    ids = prompt(200)
    full = tuple(hash_blocks(ids, PAGE))
    old_pub = publisher(url, "w", PAGE, WINDOW, epoch="inc-1", ttl=30.0)
    old_reg = WorkerRegistry(url, ttl=30.0)  # a long TTL: the old record would outlive the test
    new_reg = WorkerRegistry(url, ttl=30.0)
    rec = WorkerRecord(role="prefill", addr="127.0.0.1:1", model=MODEL, capacity_tokens=1000, worker_id="w")
    try:
        old_reg.register(replace(rec, start_id="inc-1"))
        old_pub.publish([stored("full", full), stored("swa", full[-2:])])
        assert old_pub.flush()
        assert wait_for(lambda: safe(follower, ids + [3] * 20, "w") == 12)
        p, d = route(RoutingPipeline(POLICY, follower), prompt(100, 7000), [cand("w", "inc-1")])
        assert res.record("to-old", d, p) is not None
        # the old process dies without a word: its heartbeat stops, nothing is deleted
        old_reg._stop.set()  # noqa: SLF001 - a crash, as far as Redis can tell
        old_reg._wake.set()  # noqa: SLF001
        new_reg.register(replace(rec, start_id="inc-2"))
        assert wait_for(lambda: safe(follower, ids + [3] * 20, "w") == 0, timeout=2.0)  # one heartbeat
        assert "to-old" not in follower.index.pending and follower.fenced >= 1
        # events of the old incarnation arriving late are ignored
        old_pub.publish([stored("full", full[:4])])
        assert old_pub.flush()
        assert follower.sync()
        assert follower.index.blocks("w") == (frozenset(), frozenset())
        # the new process's events count
        new_pub = publisher(url, "w", PAGE, WINDOW, epoch="inc-2")
        try:
            new_pub.publish([stored("full", full[:6]), stored("swa", full[4:6])])
            assert new_pub.flush()
            assert wait_for(lambda: safe(follower, ids[:100] + [3] * 20, "w") == 6)
        finally:
            new_pub.close()
    finally:
        res.close()
        old_pub.close()
        new_reg.close()
        pool.close()
        follower.close()


def test_a_cache_reset_while_idle_drops_blocks_and_pending_entries(
    redis_server: RedisServer, followers: list[KVIndexFollower]
) -> None:
    a, b = followers
    url = redis_server.url
    res = RoutedResidency(POLICY, a.index, url)
    ids = prompt(200)
    full = tuple(hash_blocks(ids, PAGE))
    pub = publisher(url, "w", PAGE, WINDOW, epoch="inc-1")
    try:
        pub.publish([stored("full", full), stored("swa", full[-2:])])
        assert pub.flush()
        p, d = route(RoutingPipeline(POLICY, a), prompt(100, 7000), [cand("w")])
        res.record("r", d, p)
        assert res.flush() and wait_for(lambda: "r" in b.index.pending and safe(b, ids + [1] * 20, "w") == 12)
        pub.publish([AllCleared()])  # the worker reset its cache, idle
        assert pub.flush()
        assert wait_for(lambda: safe(b, ids + [1] * 20, "w") == 0 and "r" not in b.index.pending)
        assert safe(b, prompt(100, 7000) + [1] * 20, "w") == 0
    finally:
        pub.close()
        res.close()


def test_redis_down_writes_nothing_and_nothing_pending_survives_the_outage(redis_server: RedisServer) -> None:
    url, port = redis_server.url, redis_server.port
    follower = KVIndexFollower(url, PAGE, WINDOW, block_ms=50).start()
    res = RoutedResidency(POLICY, follower.index, url)
    pipe = RoutingPipeline(POLICY, follower)
    try:
        redis_server.stop()
        assert wait_for(lambda: not follower.redis_ok)
        p, d = route(pipe, prompt(100), [cand("w")])
        assert d.reason == "index_unavailable"  # load only, as before: the dispatcher records nothing
        res.record("local", d, p)  # what a buggy caller would do: kept locally, never written
        res.flush(timeout=3.0)
        assert res.lost >= 1
        with RedisServer(port=port):
            assert wait_for(lambda: follower.redis_ok and follower.ready, timeout=15)
            assert wait_for(lambda: "local" not in follower.index.pending)  # the reload rebuilt from Redis
    finally:
        res.close()
        follower.close()


@pytest.mark.parametrize("seed", range(6))
def test_whole_pages_come_packed_from_the_hash_chain(seed: int) -> None:
    """The entry's pages and their wire bytes straight from the chain: the same as hashing the
    whole prompt and packing the ints, page-aligned prompts (one page past routing) included."""
    rng = random.Random(seed)
    n = rng.choice([PAGE * rng.randrange(1, 300), rng.randrange(1, 5000)])
    ids = array.array("I", [rng.randrange(2**32) for _ in range(n)])
    want = tuple(hash_blocks(ids, PAGE))
    routing = RoutingPipeline(POLICY)
    prompt = routing.prepare(ids)
    if len(prompt.block_hashes) and rng.random() < 0.5:  # partly hashed already (a match read some)
        _ = prompt.block_hashes[rng.randrange(len(prompt.block_hashes))]
    full, packed = whole_pages_packed(prompt, PAGE)
    assert full == want and packed == pack_hashes(want)
    as_list = replace(prompt, block_hashes=list(prompt.block_hashes))
    assert whole_pages_packed(as_list, PAGE) == (want, b"")  # no chain bytes: the writer packs them


def test_a_host_tier_follower_takes_no_pending_entries(
    redis_server: RedisServer, followers: list[KVIndexFollower]
) -> None:
    """Pending entries announce device (L1) residency: the L2 index never holds them."""
    a = followers[0]
    l2 = KVIndexFollower(redis_server.url, PAGE, PAGE, tier="l2", block_ms=50).start()
    res = RoutedResidency(POLICY, a.index, redis_server.url)
    try:
        p, d = route(RoutingPipeline(POLICY, a), prompt(100), [cand("w")])
        res.record("r", d, p)
        assert res.flush() and wait_for(lambda: "r" in followers[1].index.pending)
        assert l2.sync() and len(l2.index.pending) == 0
    finally:
        res.close()
        l2.close()


def test_pending_load_counts_until_the_workers_next_load_report() -> None:
    """Work routed to a worker after its last load report counts as its load (a burst's decisions
    see each other); once the worker reports after the decision, its own load says it."""
    from services.common.pending_residency import PendingEntry
    from services.common.prefix_index import PrefixIndex

    class Source:
        def __init__(self, index: PrefixIndex) -> None:
            self.index, self.ready, self.redis_ok = index, True, True

    index = PrefixIndex(PAGE, WINDOW)
    pipe = RoutingPipeline(replace(POLICY, pending_ttl_max_s=60.0), Source(index))  # type: ignore[arg-type]
    other = tuple(hash_blocks(prompt(64, 50_000), PAGE))
    now = 1_000_000.0
    index.clock = lambda: now
    index.add_pending(PendingEntry("busy", "w0", other, (), now + 30, "", tokens=50_000, at=now - 1))
    assert index.pending_tokens("w0", now - 2) == 50_000 and index.pending_tokens("w0", now) == 0
    ids = prompt(300, 9_000)
    stale = [replace(cand("w0"), updated_at=now - 2), replace(cand("w1"), updated_at=now - 2)]
    assert pipe.decide(ids, stale, [cand("decode")]).prefill.worker_id == "w1"
    fresh = [replace(cand("w0"), updated_at=now), replace(cand("w1", queued=100), updated_at=now)]
    assert pipe.decide(ids, fresh, [cand("decode")]).prefill.worker_id == "w0"  # w0 reported since: idle
