"""PrefixIndex: window-safe matching per worker, against brute force and against the engine's radix cache."""

from __future__ import annotations

import random
import statistics
import time

import pytest

from services.common.block_hash import BlockHash, hash_blocks
from services.common.kv_events import AllCleared, BlockRemoved, BlockStored, EventBuffer
from services.common.pending_residency import PendingEntry
from services.common.prefix_index import PrefixIndex, WorkerMatch
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import RadixCache

PS = 4


def chain(n: int, seed: int = 0) -> list[BlockHash]:
    return hash_blocks([(seed * 1000 + i) % 50_000 for i in range(n * PS)], PS)


def stored(kind, hashes) -> BlockStored:
    return BlockStored(kind, tuple(hashes), BlockHash(0), tuple([0] * PS * len(hashes)), PS)


def removed(kind, hashes) -> BlockRemoved:
    return BlockRemoved(kind, tuple(hashes))


H = chain(10)

# (window, full pages present, swa pages present) -> (raw, safe) for a query of all 10 pages
TABLE = [
    (8, range(10), range(10), (10, 10)),
    (8, range(10), [8, 9], (10, 10)),  # the tail alone is enough
    (8, range(10), [9], (10, 0)),  # tombstoned tail: 9 lacks 8, ..., nothing before either
    (8, range(10), [0, 1, 2, 3, 9], (10, 4)),  # partial hit at the last safe point
    (8, range(10), [0, 1, 2, 3, 6, 7], (10, 8)),  # tail of 8 present, 9's window is not
    (8, range(6), range(10), (6, 6)),  # full KV bounds everything
    (8, [0, 1, 2, 4, 5], range(10), (3, 3)),  # a full hole ends the raw match
    (8, range(10), [], (10, 0)),
    (6, range(10), [7, 8], (10, 9)),  # window 6 overlaps 2 pages of 4: 10 needs 9, 8; 9 needs 8, 7
    (6, range(9), [7, 8], (9, 9)),
    (4, range(10), [9], (10, 10)),
    (0, range(10), [], (10, 10)),  # no SWA layers: safe == raw
    (0, [0, 1, 3], [], (2, 2)),
    (8, [], range(10), (0, 0)),
]


@pytest.mark.parametrize("window,full,swa,want", TABLE)
def test_window_safety_table(window, full, swa, want):
    idx = PrefixIndex(PS, window)
    idx.apply("w", stored("full", [H[i] for i in full]))
    idx.apply("w", stored("swa", [H[i] for i in swa]))
    assert idx.match(H) == {"w": WorkerMatch(*want)}


def test_a_tombstoned_tail_is_a_partial_hit_and_the_tail_makes_it_whole():
    idx = PrefixIndex(PS, 8)
    for w in ("a", "b"):
        idx.apply(w, stored("full", H))
        idx.apply(w, stored("swa", H[:4]))  # a prompt end at page 4 kept its tail
        idx.apply(w, stored("swa", H[8:]))
    idx.apply("a", removed("swa", H[8:]))  # a's tail at 10 tombstoned
    assert idx.match(H) == {"a": WorkerMatch(10, 4), "b": WorkerMatch(10, 10)}
    assert idx.match(H[:6], ["a", "ghost"]) == {"a": WorkerMatch(6, 4), "ghost": WorkerMatch(0, 0)}


def test_workers_clear_and_remove():
    idx = PrefixIndex(PS, 8)
    idx.apply("a", stored("full", H))
    idx.apply("a", stored("swa", H))
    idx.apply("b", stored("full", H[:3]))
    assert idx.workers() == {"a", "b"} and idx.num_blocks() == (10, 10)
    idx.apply("a", AllCleared())
    assert idx.workers() == {"a", "b"} and idx.blocks("a") == (frozenset(), frozenset())
    assert idx.match(H)["a"] == WorkerMatch(0, 0) and idx.num_blocks() == (3, 0)
    idx.remove_worker("b")
    assert idx.workers() == {"a"} and idx.num_blocks() == (0, 0)
    idx.apply("c", stored("full", H[:2]))  # takes b's freed bit: no stale bits in the masks
    assert idx.match(H) == {"a": WorkerMatch(0, 0), "c": WorkerMatch(2, 0)}
    idx.load_worker("c", H[:5], H[3:5])
    assert idx.match(H, ["c"]) == {"c": WorkerMatch(5, 5)}


def brute(state, hashes, window):
    need = -(-window // PS)
    out = {}
    for w, (full, swa) in state.items():
        raw = 0
        while raw < len(hashes) and hashes[raw] in full:
            raw += 1
        safe = raw
        while safe > 0 and not all(hashes[j] in swa for j in range(max(0, safe - need), safe)):
            safe -= 1
        out[w] = WorkerMatch(raw, safe)
    return out


@pytest.mark.parametrize("window", [8, 0, 6])
def test_matches_brute_force_on_random_events(window):
    rng = random.Random(window)
    chains = [chain(12, s) for s in range(4)]
    chains += [c[:5] + chain(7, 10 + i) for i, c in enumerate(chains)]  # shared prefixes
    universe = sorted({h for c in chains for h in c})
    workers = [f"w{i}" for i in range(7)]
    idx = PrefixIndex(PS, window)
    state: dict[str, tuple[set, set]] = {}
    for step in range(3000):
        w = rng.choice(workers)
        r = rng.random()
        # an unknown worker becomes known by a store or a clear, not by a removal
        full, swa = (
            state.setdefault(w, (set(), set()))
            if r < 0.01 or 0.015 <= r < 0.6
            else state.get(w, (set(), set()))
        )
        kind = rng.choice(["full", "swa"])
        target = full if kind == "full" else swa
        if r < 0.01:
            idx.apply(w, AllCleared())
            full.clear()
            swa.clear()
        elif r < 0.015:
            idx.remove_worker(w)
            state.pop(w, None)
        elif r < 0.6:
            c = rng.choice(chains)
            lo = rng.randrange(len(c))
            hs = c[lo : rng.randrange(lo, len(c)) + 1]
            idx.apply(w, stored(kind, hs))
            target.update(hs)
        else:
            hs = rng.sample(universe, rng.randrange(1, 6))
            idx.apply(w, removed(kind, hs))
            target.difference_update(hs)
        if step % 10 == 0:
            q = rng.choice(chains)[: rng.randrange(13)]
            assert idx.match(q) == brute(state, q, window)
            some = rng.sample(workers, 3)
            want = brute(state, q, window)
            assert idx.match(q, some) == {x: want.get(x, WorkerMatch(0, 0)) for x in some}
    assert idx.workers() == set(state)
    assert idx.state() == {w: (frozenset(f), frozenset(s)) for w, (f, s) in sorted(state.items())}


def test_follows_a_real_radix_cache_through_its_events():
    """Events of the engine's radix cache (inserts with tombstones, SWA and full eviction) make the
    index report the cache's own raw_len and safe_len."""
    window = 8
    rng = random.Random(7)
    full_pool, swa_pool = PagePool(64, PS, "full"), PagePool(64, PS, "swa")
    events = EventBuffer()
    cache = RadixCache(PS, window, full_pool, swa_pool, events)
    idx = PrefixIndex(PS, window)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(4, 40))] for _ in range(6)]
    prompts += [p[: len(p) // 2] + [rng.randrange(50) for _ in range(12)] for p in prompts]
    for _ in range(200):
        tokens = rng.choice(prompts)
        tokens = tokens[: len(tokens) // PS * PS]
        n = len(tokens) // PS
        if n and full_pool.num_free >= n and swa_pool.num_free >= n:
            full = full_pool.alloc(n)
            swa = swa_pool.alloc(n)
            keep = [s if rng.random() < 0.6 else None for s in swa]
            cache.insert(tokens, full, keep)
            full_pool.decref(full)
            swa_pool.decref(swa)
        if rng.random() < 0.3:
            cache.evict_swa(rng.randrange(1, 6))
        if full_pool.num_free < 16:
            cache.evict_full(rng.randrange(1, 12))
        for e in events.drain():
            idx.apply("w", e)
        q = rng.choice(prompts)
        m = cache.match(q)
        got = idx.match(hash_blocks(q, PS))["w"]
        assert (got.raw_blocks * PS, got.safe_blocks * PS) == (m.raw_len, m.safe_len)


def test_match_is_fast_for_64_workers_and_512_blocks():
    """The router's budget: 64 workers x 512 blocks (32k tokens at page 64) well under 1 ms."""
    idx = PrefixIndex(16, 128)
    hashes = chain(512, 99)
    for i in range(64):
        depth = 512 if i < 16 else (i * 37) % 512  # a quarter hold everything, the rest some prefix
        idx.apply(f"w{i}", stored("full", hashes[:depth]) if depth else AllCleared())
        idx.apply(f"w{i}", stored("swa", hashes[max(0, depth - 8) : depth]))
    times = []
    for _ in range(50):
        t = time.perf_counter()
        res = idx.match(hashes)
        times.append(time.perf_counter() - t)
    assert res["w0"] == WorkerMatch(512, 512) and res["w20"] == WorkerMatch(228, 228)
    assert statistics.median(times) < 1e-3, f"median {statistics.median(times) * 1e3:.3f} ms"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_long_prompts_many_workers_and_pending_entries_match_brute_force(seed):
    """Prompts of hundreds of pages (the match reads them in chunks of 16, 32, 64, ... pages and
    bisects the running AND), 70 workers (masks past 64 bits), stores and removals listing a hash
    twice, holes, and pending entries (routing-time residency) counted like real blocks."""
    rng = random.Random(seed)
    window = rng.choice([0, 8, 16])
    base = [chain(700, 100 + s) for s in range(3)]
    chains = base + [b[: rng.randrange(1, 700)] + chain(300, 200 + i) for i, b in enumerate(base)]
    workers = [f"w{i}" for i in range(70)]
    idx = PrefixIndex(PS, window)
    idx.clock = lambda: 0.0  # pending deadlines never pass here
    state: dict[str, tuple[set, set]] = {}
    pid = 0
    for step in range(400):
        w = rng.choice(workers)
        full, swa = state.setdefault(w, (set(), set()))
        c = rng.choice(chains)
        r = rng.random()
        if r < 0.45:  # a prefix (or a slice) stored, some pages listed twice, maybe a hole
            hs = c[: rng.randrange(1, len(c) + 1)] if rng.random() < 0.7 else c[rng.randrange(50) :][:200]
            hs = hs + rng.sample(hs, min(len(hs), 3))
            if rng.random() < 0.3:
                del hs[rng.randrange(len(hs))]
            kind = rng.choice(["full", "swa"])
            idx.store(w, kind, hs)
            (full if kind == "full" else swa).update(hs)
        elif r < 0.65:
            kind = rng.choice(["full", "swa"])
            own = sorted(full if kind == "full" else swa)
            hs = rng.sample(own, min(len(own), rng.randrange(1, 40))) if own else [c[0]]
            idx.remove(w, kind, hs + hs[:2])
            (full if kind == "full" else swa).difference_update(hs)
        elif r < 0.9:  # routing-time residency: what the worker is about to hold
            pid += 1
            end = rng.randrange(1, len(c) + 1)
            need = -(-window // PS)
            entry = PendingEntry(f"p{pid}", w, tuple(c[:end]), tuple(c[max(0, end - need) : end]), 1e9)
            idx.add_pending(entry)
        else:
            live = idx.pending.entries()
            if live:
                idx.drop_pending(rng.choice(live).pid)
        q = rng.choice(chains)[: rng.randrange(1, 1000)]
        known = idx.workers()  # (which workers are known is the test above's; here, their matches)
        seen = {x: (set(state[x][0]), set(state[x][1])) if x in state else (set(), set()) for x in known}
        for e in idx.pending.entries():
            seen[e.worker][0].update(e.full)
            seen[e.worker][1].update(e.swa)
        assert idx.match(q) == brute(seen, q, window), step
        some = rng.sample(workers, 5)
        want = brute(seen, q, window)
        assert idx.match(q, some) == {x: want.get(x, WorkerMatch(0, 0)) for x in some}
    assert idx.state() == {w: (frozenset(f), frozenset(s)) for w, (f, s) in sorted(state.items()) if w in known}
