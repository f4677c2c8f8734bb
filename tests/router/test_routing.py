"""RoutingPipeline: prompt ids + candidates -> RoutingDecision. Decisions, reasons, determinism across
two pipelines (and two Redis-backed pools), and load-only routing while Redis is down."""

from __future__ import annotations

import array
import random
from collections.abc import Iterator
from dataclasses import replace

import pytest
import redis

from services.common.block_hash import hash_blocks
from services.common.prompt_wire import pack_ids
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.discovery import RedisWorkerPool
from services.router.policy import Candidate, LengthBucket, PolicyConfig
from services.router.routing import (
    CandidateSource,
    NoCandidate,
    RoutingDecision,
    RoutingPipeline,
    candidates_of,
    policy_reads_l2,
    prompt_key,
)
from services.router.workers import StaticWorkerPool
from tests.router.fake_index import FakeIndexSource, FakePrefixIndex
from tests.waiting import wait_for as _wait

PAGE, WINDOW = 16, 32
CFG = PolicyConfig(page_size=PAGE, window=WINDOW)


def cand(wid: str, role: str = "prefill", **kw: object) -> Candidate:
    base: dict[str, object] = dict(capacity_tokens=100_000, free_kv_tokens=100_000, has_load=True)
    return Candidate(worker_id=wid, addr=f"{wid}:1", role=role, **{**base, **kw})  # type: ignore[arg-type]


PREFILL = [cand("p0"), cand("p1"), cand("p2")]
DECODE = [cand("d0", "decode"), cand("d1", "decode")]


def prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1, 50_000) for _ in range(n)]


@pytest.fixture
def source() -> FakeIndexSource:
    return FakeIndexSource(FakePrefixIndex(PAGE, WINDOW))


def pipeline(source: FakeIndexSource | None, cfg: PolicyConfig = CFG) -> RoutingPipeline:
    return RoutingPipeline(cfg, source)


# -- one decision --------------------------------------------------------------------------------
def test_a_window_safe_hit_decides_and_sets_the_uncached_estimate(source: FakeIndexSource) -> None:
    p = pipeline(source)
    ids = prompt(10 * PAGE + 3)
    hashes = p.prepare(ids).block_hashes
    source.index.store("p1", hashes[:6])  # 6 pages with their SWA tail
    source.index.store("p2", hashes)  # all 10 pages, but the SWA tail dropped
    source.index.tombstone("p2", hashes[5:])
    d = p.decide(ids, PREFILL, DECODE, max_tokens=8)
    assert d.prefill.worker_id == "p1"
    assert (d.safe_match_tokens, d.raw_match_tokens) == (6 * PAGE, 6 * PAGE)
    assert d.uncached_tokens == len(ids) - 6 * PAGE
    assert d.reason == "cache_hit" and d.prompt_tokens == len(ids)
    assert [c.worker_id for c in d.prefill_ranking][0] == "p1" and len(d.prefill_ranking) == 3
    assert {c.worker_id for c in d.decode_ranking} == {"d0", "d1"} and d.decode == d.decode_ranking[0]
    # p2's raw hit is longer (10 pages) but only 5 are window-safe: p1 (6) wins
    m = source.index.match(hashes)
    assert (m["p2"].raw_blocks, m["p2"].safe_blocks) == (10, 5)


def test_a_fully_cached_prompt_resumes_where_the_worker_can(source: FakeIndexSource) -> None:
    """The worker computes the last prompt token, so it resumes at page floor((n - 1) / P): a
    page-aligned prompt's last page is never credited (the engine recomputes it), a partial last
    page is computed anyway."""
    p = pipeline(source)
    aligned = prompt(4 * PAGE)
    source.index.store("p0", hash_blocks(aligned, PAGE))  # all 4 pages, SWA everywhere
    d = p.decide(aligned, PREFILL, DECODE)
    assert (d.prefill.worker_id, d.safe_match_tokens, d.uncached_tokens) == ("p0", 3 * PAGE, PAGE)
    assert d.safe_match_fraction == 0.75 and d.raw_match_fraction == 0.75
    longer = aligned + [7] * 5
    d = p.decide(longer, PREFILL, DECODE)
    assert (d.prefill.worker_id, d.safe_match_tokens, d.uncached_tokens) == ("p0", 4 * PAGE, 5)


@pytest.mark.parametrize(
    ("case", "setup", "reason", "chosen"),
    [
        ("no index at all", "none", "no_index", None),
        ("index not ready", "not_ready", "index_unavailable", None),
        ("index Redis down", "redis_down", "index_unavailable", None),
        ("nobody holds it", "empty", "cache_miss", None),
        ("the holder is chosen", "hit", "cache_hit", "p0"),
        ("the holder is swamped", "hit_busy", "load_over_cache", "p1"),
    ],
)
def test_reasons(source: FakeIndexSource, case: str, setup: str, reason: str, chosen: str | None) -> None:
    ids = prompt(8 * PAGE, seed=3)
    p = pipeline(None if setup == "none" else source)
    hashes = p.prepare(ids).block_hashes
    prefill = [cand("p0"), cand("p1")]
    if setup.startswith("hit"):
        source.index.store("p0", hashes[:2])  # a small hit: 2 of 8 pages
    if setup == "hit_busy":
        prefill = [cand("p0", queued_tokens=100_000), cand("p1")]  # ~12 s of backlog: saturated
    source.ready = setup != "not_ready"
    source.redis_ok = setup != "redis_down"
    d = p.decide(ids, prefill, DECODE)
    assert d.reason == reason, case
    if chosen:
        assert d.prefill.worker_id == chosen
    if reason in ("no_index", "index_unavailable"):
        assert d.safe_match_tokens == 0 and d.uncached_tokens == len(ids)


def test_index_failure_degrades_to_load_only(source: FakeIndexSource) -> None:
    def broken(*a: object, **k: object) -> dict[str, object]:
        raise RuntimeError("index bug")

    source.index.match = broken  # type: ignore[method-assign, assignment]
    p = pipeline(source)
    d = p.decide(prompt(64), [cand("p0", queued_tokens=10), cand("p1")], DECODE)
    assert d.prefill.worker_id == "p1" and d.reason == "cache_miss" and p.index_errors == 1


def test_failed_workers_are_avoided_while_others_remain(source: FakeIndexSource) -> None:
    p = pipeline(source)
    ids = prompt(64)
    first = p.decide(ids, PREFILL, DECODE)
    retry = p.decide(ids, PREFILL, DECODE, exclude={first.prefill.addr, first.decode.addr})
    assert retry.prefill.addr != first.prefill.addr and retry.decode.addr != first.decode.addr
    alone = p.decide(ids, PREFILL[:1], DECODE[:1], exclude={"p0:1", "d0:1"})  # no one else: same ones
    assert (alone.prefill.worker_id, alone.decode.worker_id) == ("p0", "d0")


def test_no_candidate_names_the_role() -> None:
    p = pipeline(None)
    with pytest.raises(NoCandidate, match="prefill"):
        p.decide(prompt(10), [], DECODE)
    with pytest.raises(NoCandidate, match="decode"):
        p.decide(prompt(10), PREFILL, [])
    with pytest.raises(NoCandidate, match="prefill"):  # the health filter leaves no one
        p.decide(prompt(10), [cand("p0", healthy=False)], DECODE)


def test_length_bucket_and_fallback_reach_the_decision() -> None:
    cfg = replace(CFG, buckets=(LengthBucket("s", 64), LengthBucket("l", 4096)))
    p = pipeline(None, cfg)
    prefill = [cand("s0", bucket="s"), cand("l0", bucket="l")]
    d = p.decide(prompt(10), prefill, DECODE)
    assert (d.prefill.worker_id, d.bucket, d.bucket_fallback) == ("s0", "s", "")
    d = p.decide(prompt(100), prefill, DECODE)
    assert (d.prefill.worker_id, d.bucket, d.bucket_fallback) == ("l0", "l", "")
    d = p.decide(prompt(100), prefill[:1], DECODE)
    assert (d.prefill.worker_id, d.bucket, d.bucket_fallback) == ("s0", "s", "l")


def test_static_pool_candidates_have_no_load_and_still_route() -> None:
    pool = StaticWorkerPool(["a:1", "b:1"], ["c:1"])
    pre, dec = candidates_of(pool, "prefill"), candidates_of(pool, "decode")
    assert [(c.worker_id, c.has_load) for c in pre] == [("a:1", False), ("b:1", False)]
    d = pipeline(None).decide(prompt(10), pre, dec)
    assert d.reason == "no_index" and d.prefill.addr in ("a:1", "b:1") and d.decode.addr == "c:1"


# -- determinism ---------------------------------------------------------------------------------
def _signature(d: RoutingDecision) -> tuple[object, ...]:
    return (
        d.prefill.worker_id,
        tuple(c.worker_id for c in d.decode_ranking),
        tuple(c.worker_id for c in d.prefill_ranking),
        d.uncached_tokens,
        d.reason,
    )


def _conversations(rng: random.Random, n: int) -> Iterator[list[int]]:
    """Requests that share prefixes: a few conversations growing turn by turn, interleaved."""
    convs = [prompt(rng.randrange(20, 90), seed=s) for s in range(6)]
    for _ in range(n):
        i = rng.randrange(len(convs))
        convs[i] = convs[i] + prompt(rng.randrange(5, 40), seed=rng.randrange(10**6))
        yield list(convs[i])


@pytest.mark.parametrize("policy", ["seed", "cost"])
def test_two_pipelines_decide_the_same_for_the_same_sequence(policy: str) -> None:
    """Two replicas (own pipeline, own index source over the same state) agree on every decision,
    in ties too: nothing in a decision depends on the replica's own history."""
    cfg = replace(CFG, prefill_policy=policy)
    rng = random.Random(7)
    index = FakePrefixIndex(PAGE, WINDOW)
    a, b = RoutingPipeline(cfg, FakeIndexSource(index)), RoutingPipeline(cfg, FakeIndexSource(index))
    prefill = [cand(f"p{i}") for i in range(5)]
    decode = [cand(f"d{i}", "decode") for i in range(3)]
    chosen = set()
    for ids in _conversations(rng, 80):
        # the "Redis state" changes between requests: loads and what the chosen worker cached
        prefill = [replace(c, queued_tokens=rng.choice([0, 0, 50, 400])) for c in prefill]
        decode = [
            replace(c, running=rng.randrange(3), free_kv_tokens=rng.choice([5000, 9000])) for c in decode
        ]
        da, db = (
            a.decide(ids, prefill, decode, max_tokens=16),
            b.decide(list(ids), list(prefill), list(decode), max_tokens=16),
        )
        assert _signature(da) == _signature(db)
        chosen.add(da.prefill.worker_id)
        index.store(da.prefill.worker_id, a.prepare(ids).block_hashes)
    assert len(chosen) >= 3  # and the sequence really exercised several workers


def test_siblings_of_a_new_prefix_break_ties_alike_on_replicas_that_have_not_seen_each_other() -> None:
    """A burst sharing a new prefix, spread over replicas whose indexes have not yet seen each other's
    decisions (each stores only its own, as before the pending stream is read): on an idle fleet every
    replica's first sibling goes to the same worker, for many random prefixes; and new conversations
    behind a system prompt every worker caches do not all go to one worker."""
    cfg = replace(CFG, prefill_policy="seed")
    prefill = [cand(f"p{i}") for i in range(8)]
    rng = random.Random(3)
    for trial in range(20):
        shared = prompt(6 * PAGE + rng.randrange(PAGE), seed=1000 + trial)
        replicas = [pipeline(FakeIndexSource(FakePrefixIndex(PAGE, WINDOW)), cfg) for _ in range(4)]
        chosen = set()
        for r, pipe in enumerate(replicas):
            ids = shared + prompt(rng.randrange(PAGE, 4 * PAGE), seed=10_000 * trial + r)
            d = pipe.decide(ids, prefill, DECODE, max_tokens=8)
            pipe.index.index.store(d.prefill.worker_id, pipe.prepare(ids).block_hashes)  # its own only
            chosen.add(d.prefill.worker_id)
        assert len(chosen) == 1, (trial, chosen)

    source = FakeIndexSource(FakePrefixIndex(PAGE, WINDOW))
    p = pipeline(source, cfg)
    system = prompt(4 * PAGE, seed=99)
    for c in prefill:  # the system prompt, window-safe at its end, on every worker
        source.index.store(c.worker_id, p.prepare(system + [1]).block_hashes)
    firsts = {
        p.decide(system + prompt(5 * PAGE, seed=s), prefill, DECODE, max_tokens=8).prefill.worker_id
        for s in range(40)
    }
    assert len(firsts) >= 4  # spread by their own first page, not all sent to one worker


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as srv:
        yield srv


def _register(url: str, role: str, addr: str, load: dict[str, int], **labels: str) -> WorkerRegistry:
    reg = WorkerRegistry(url, ttl=3.0)
    record = WorkerRecord(role=role, addr=addr, model="m", capacity_tokens=10_000, labels=dict(labels))
    reg.register(record, load_fn=lambda: load)
    return reg


def test_two_redis_backed_replicas_agree(redis_server: RedisServer) -> None:
    url = redis_server.url
    loads = {
        f"p{i}": {"queued_tokens": q, "free_kv_tokens": 10_000, "running": 0}
        for i, q in enumerate([0, 0, 30, 0])
    }
    regs = [_register(url, "prefill", f"p{i}:1", loads[f"p{i}"]) for i in range(4)]
    regs += [
        _register(url, "decode", f"d{i}:1", {"free_kv_tokens": 4000 + i, "running": 0}) for i in range(2)
    ]
    index = FakePrefixIndex(PAGE, WINDOW)
    pools = [RedisWorkerPool(url, model="m", refresh_s=0.1) for _ in range(2)]
    replicas = [RoutingPipeline(CFG, FakeIndexSource(index)) for _ in range(2)]
    try:
        for pool in pools:
            assert _wait(lambda pool=pool: len(pool.routable_records("prefill")) == 4)  # type: ignore[misc]
        rng = random.Random(1)
        for ids in _conversations(rng, 40):
            ds = [r.decide(ids, candidates_of(p, "prefill"), candidates_of(p, "decode"))
                  for r, p in zip(replicas, pools, strict=True)]  # fmt: skip
            assert _signature(ds[0]) == _signature(ds[1])
            index.store(ds[0].prefill.worker_id, replicas[0].prepare(ids).block_hashes)
        assert ds[0].decode.addr == "d1:1"  # the decode worker with more free KV
    finally:
        for p in pools:
            p.close()
        for r in regs:
            r.close()


class RedisIndexSource(FakeIndexSource):
    """A fake index whose `redis_ok` is the truth about a real redis-server (as the follower's is)."""

    def __init__(self, index: FakePrefixIndex, url: str) -> None:
        super().__init__(index)
        self.client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    @property  # type: ignore[override]
    def redis_ok(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    @redis_ok.setter
    def redis_ok(self, value: bool) -> None:
        pass


def test_redis_down_routes_by_load_from_the_last_snapshot_and_recovers(redis_server: RedisServer) -> None:
    url, port = redis_server.url, redis_server.port
    regs = [
        _register(url, "prefill", "holder:1", {"queued_tokens": 40, "free_kv_tokens": 10_000}),
        _register(url, "prefill", "idle:1", {"queued_tokens": 0, "free_kv_tokens": 10_000}),
        _register(url, "decode", "d:1", {"free_kv_tokens": 5000}),
    ]
    pool = RedisWorkerPool(url, model="m", refresh_s=0.1)
    source = RedisIndexSource(FakePrefixIndex(PAGE, WINDOW), url)
    p = RoutingPipeline(CFG, source)
    ids = prompt(8 * PAGE)
    source.index.store("holder:1", p.prepare(ids).block_hashes)  # registry worker_id defaults to addr

    def decide() -> RoutingDecision:
        return p.decide(ids, candidates_of(pool, "prefill"), candidates_of(pool, "decode"))

    try:
        assert _wait(lambda: len(pool.routable_records("prefill")) == 2)
        up = decide()
        assert (up.prefill.addr, up.reason, up.uncached_tokens) == ("holder:1", "cache_hit", PAGE)
        redis_server.stop()
        assert _wait(lambda: not pool.redis_ok)
        down = decide()  # load only, from the last registry snapshot: the idle worker
        assert (down.prefill.addr, down.reason, down.uncached_tokens) == (
            "idle:1",
            "index_unavailable",
            len(ids),
        )
        assert down.decode.addr == "d:1" and pool.redis_errors >= 1
        with RedisServer(port=port):
            assert _wait(lambda: pool.redis_ok and len(pool.routable_records("prefill")) == 2, timeout=15)
            back = decide()
            assert (back.prefill.addr, back.reason) == ("holder:1", "cache_hit")
    finally:
        pool.close()
        for r in regs:
            r.close()


def test_a_worker_leaving_the_registry_is_forgotten_by_the_index(redis_server: RedisServer) -> None:
    source = FakeIndexSource(FakePrefixIndex(PAGE, WINDOW))
    reg = _register(redis_server.url, "prefill", "p:1", {})
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=0.1, on_leave=source.forget_worker)
    try:
        assert _wait(lambda: len(pool.routable_records("prefill")) == 1)
        reg.close()  # deregisters
        assert _wait(lambda: source.forgotten == ["p:1"])
    finally:
        pool.close()


def test_the_real_prefix_index_plugs_in() -> None:
    prefix_index = pytest.importorskip("services.common.prefix_index")
    index = prefix_index.PrefixIndex(PAGE, WINDOW)
    p = RoutingPipeline(CFG, FakeIndexSource(index))  # type: ignore[arg-type]
    ids = prompt(8 * PAGE + 1)
    hashes = p.prepare(ids).block_hashes
    index.store("p0", "full", hashes)
    index.store("p0", "swa", hashes[:-2])  # the SWA of the last two pages tombstoned
    index.store("p1", "full", hashes[:7])
    index.store("p1", "swa", hashes[:7])
    d = p.decide(ids, [cand("p0"), cand("p1")], DECODE)
    assert d.prefill.worker_id == "p1" and d.safe_match_tokens == 7 * PAGE
    m = index.match(hashes)["p0"]
    assert (m.raw_blocks, m.safe_blocks) == (8, 6)  # 8 pages need SWA on pages 6, 7; 7 on 5, 6


def test_candidate_source_rebuilds_only_when_the_snapshot_changes(redis_server: RedisServer) -> None:
    reg = _register(redis_server.url, "prefill", "p:1", {"queued_tokens": 5})
    pool = RedisWorkerPool(redis_server.url, model="m", refresh_s=1000)  # refreshed by hand below
    source = CandidateSource(pool)
    try:
        first = source("prefill")
        assert [(c.addr, c.queued_tokens, c.has_load) for c in first] == [("p:1", 5, True)]
        assert source("prefill") is first  # same snapshot: no rebuild
        pool.mark_down("p:1")
        assert source("prefill") == []

        def back() -> bool:
            pool.refresh()  # the worker's next heartbeat (after the mark) brings it back
            return source("prefill") != []

        assert _wait(back)
    finally:
        pool.close()
        reg.close()


def test_the_cost_policy_credits_a_hit_in_a_workers_host_tier(source: FakeIndexSource) -> None:
    """L2 (tier "l2" events, a one-page window: a tail end is an SWA entry) gives the cost scorer
    and the seed their L2 credit; the seed without it (`seed_l2_credit=False`) is L1-only."""
    l2 = FakeIndexSource(FakePrefixIndex(PAGE, PAGE))
    ids = prompt(20 * PAGE + 3, seed=21)
    hashes = hash_blocks(ids, PAGE)
    l2.index.store("p2", hashes[:16])  # p2 can restore 16 pages from host memory
    source.index.store("p1", hashes[:2])  # p1 has 2 pages on its device
    cost = RoutingPipeline(replace(CFG, prefill_policy="cost"), source, l2_index=l2)
    d = cost.decide(ids, PREFILL, DECODE)
    assert d.prefill.worker_id == "p2"  # 16 pages at 0.75 beat 2 pages at 1.0
    seed = RoutingPipeline(CFG, source, l2_index=l2)
    assert seed.decide(ids, PREFILL, DECODE).prefill.worker_id == "p2"  # host-tier residency is routable
    l1_only = RoutingPipeline(replace(CFG, seed_l2_credit=False), source, l2_index=l2)
    assert l1_only.decide(ids, PREFILL, DECODE).prefill.worker_id == "p1"
    l2.ready = False  # an L2 index not ready gives no credit
    assert cost.decide(ids, PREFILL, DECODE).prefill.worker_id == "p1"


def test_the_decode_ranking_needs_no_hashes_and_is_the_decisions(source: FakeIndexSource) -> None:
    p = pipeline(source)
    tied = [cand(f"d{i}", "decode") for i in range(4)]  # ties: the order is the prompt key's
    loaded = [cand("d0", "decode", free_kv_tokens=10), cand("d1", "decode", running=3), *tied[2:]]
    for seed, dec in [(0, tied), (1, tied), (2, loaded)]:
        ids = prompt(100, seed)
        hashed = p.prepare(ids)
        ranking = p.rank_decode(len(ids), hashed.key, dec, max_tokens=8)
        assert p.decide(hashed, PREFILL, dec, max_tokens=8).decode_ranking == ranking
        given = p.decide(hashed, PREFILL, [], max_tokens=8, decode_ranking=ranking[::-1])
        assert given.decode_ranking == ranking[::-1] and given.decode == ranking[-1]
    orders = {
        tuple(c.worker_id for c in p.rank_decode(100, p.prepare(prompt(100, s)).key, tied)) for s in range(8)
    }
    assert len(orders) > 1  # different prompts spread over tied workers


def test_prepare_takes_a_list_or_an_array_and_keys_by_the_packed_prompt() -> None:
    p = pipeline(None)
    ids = prompt(70)
    a, b = p.prepare(ids), p.prepare(array.array("I", ids))
    assert (
        (list(a.block_hashes), a.key)
        == (list(b.block_hashes), b.key)
        == (hash_blocks(ids, PAGE)[:4], prompt_key(pack_ids(ids)))
    )
    assert p.prepare(ids[:-1]).key != a.key and p.prepare(ids[:-1] + [ids[-1] + 1]).key != a.key
    assert p.prepare(ids, key=b"given").key == b"given"


def test_only_a_policy_that_reads_l2_matches_the_l2_index(source: FakeIndexSource) -> None:
    """The L2 index is matched (and followed, services/router/main.py) only for a scorer that reads
    host-tier hits: a profile without one does not pay for a second match per request."""
    l2 = FakeIndexSource(FakePrefixIndex(PAGE, PAGE))
    calls = []
    real_match = l2.index.match
    l2.index.match = lambda hashes: calls.append(1) or real_match(hashes)  # type: ignore[method-assign]
    ids = prompt(20 * PAGE + 3, seed=22)
    l1_only = replace(CFG, seed_l2_credit=False)
    RoutingPipeline(l1_only, source, l2_index=l2).decide(ids, PREFILL, DECODE)
    assert calls == []
    RoutingPipeline(replace(CFG, prefill_policy="cost"), source, l2_index=l2).decide(ids, PREFILL, DECODE)
    assert calls == [1]
    RoutingPipeline(CFG, source, l2_index=l2).decide(ids, PREFILL, DECODE)  # the default seed reads it
    assert calls == [1, 1]
    assert not policy_reads_l2(l1_only) and policy_reads_l2(replace(CFG, prefill_policy="cost"))
    assert policy_reads_l2(CFG)
