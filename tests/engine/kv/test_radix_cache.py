
import pytest

from services.common.block_hash import ROOT_HASH, hash_blocks
from services.common.kv_events import AllCleared, BlockRemoved, BlockStored
from tests.engine.kv.radix_env import Env

SEQ = list(range(100, 164))  # 64 tokens = 16 pages of 4


# ---- window-safe match ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "tombstones", "query_len", "safe_len", "raw_len"),
    [
        # window 8 = 2 pages; page 7 = tokens [28, 32) lost its SWA KV
        (8, {7}, 64, 64, 64),  # the window [56, 64) is intact
        (8, {7}, 40, 40, 40),
        (8, {7}, 36, 28, 36),  # needs [28, 36): page 7 missing -> back off to 28
        (8, {7}, 32, 28, 32),  # needs [24, 32): page 7 missing
        (8, {7}, 31, 28, 28),  # only whole pages match
        (8, {7}, 28, 28, 28),
        (8, {7}, 3, 0, 0),
        (8, {14}, 64, 56, 64),  # the tail itself is hit
        (8, {13, 10}, 56, 52, 56),  # 56 needs pages 12, 13 -> 52 needs 11, 12
        (8, {13, 10}, 48, 40, 48),  # 48 needs 10, 11 -> 40 needs 8, 9
        (10, {7}, 40, 28, 40),  # window 10 needs 3 pages: 7, 8, 9
        (10, {7}, 44, 44, 44),
        (100, {7}, 64, 28, 64),  # window longer than the prefix: clamped at 0
        (0, set(range(16)), 64, 64, 64),  # no window, no SWA needed
        (8, set(range(16)), 64, 0, 64),  # raw matching tokens are never hits
    ],
)
def test_window_safe_match_backs_off(
    window: int, tombstones: set[int], query_len: int, safe_len: int, raw_len: int
) -> None:
    env = Env(window=window)
    _, full, swa = env.put(SEQ, [i not in tombstones for i in range(16)])
    m = env.cache.match(SEQ[:query_len])
    assert (m.safe_len, m.raw_len) == (safe_len, raw_len)
    k = safe_len // 4
    assert m.full_pages == full[:k]
    first = max(0, safe_len - window) // 4
    assert m.swa_pages == [None] * first + swa[first:k]
    assert m.node.end == safe_len
    env.cache.check_invariants()


def test_match_miss_and_divergence() -> None:
    env = Env()
    env.put(SEQ)
    assert env.cache.match([1, 2, 3, 4, 5]).raw_len == 0
    m = env.cache.match(SEQ[:20] + [0] * 20)  # diverges inside page 5
    assert (m.safe_len, m.raw_len) == (20, 20)
    assert m.node.is_root is False and m.node.end == 20
    assert env.cache.match([]).node is env.cache.root


def test_evict_swa_tombstone_in_the_middle() -> None:
    env = Env()
    env.put(SEQ)
    env.put(SEQ[:28] + [0] * 36)  # branch at 28 (a retention point), new leaf [28, 64)
    env.cache.match(SEQ[:28] + [0] * 36)  # the second sequence is the more recent
    assert env.cache.evict_swa(1) == 1
    # the least recent DEEP page is the first one of SEQ's own node [28, 64): page 7
    m = env.cache.match(SEQ[:36])
    assert (m.safe_len, m.raw_len) == (28, 36)
    assert env.cache.match(SEQ).safe_len == 64
    removed = [e for e in env.events.drain() if isinstance(e, BlockRemoved)]
    assert removed == [BlockRemoved("swa", (hash_blocks(SEQ, 4)[7],))]


# ---- retention ---------------------------------------------------------------------------------


def test_tails_outlive_deep_pages() -> None:
    env = Env(page_size=4, window=8)
    prompt, out = SEQ, list(range(500, 518))  # the request decoded 18 tokens
    env.put(prompt)  # prompt end: retention point at 64
    finished = prompt + out[:16]  # 80 cached; the partial page [80, 82) is not
    env.put(finished, [i >= 18 for i in range(20)])  # the request kept only its last window of SWA
    tails = {14, 15, 18, 19}
    hashes = hash_blocks(finished, 4)
    tail_hashes = {hashes[i] for i in tails}
    deep = env.cache.evictable_swa_pages(include_tails=False)
    assert deep == 16 - 2 and env.cache.total_swa_pages() == 18
    env.events.drain()
    for _ in range(deep):
        assert env.cache.evict_swa(1) == 1
        (event,) = env.events.drain()
        assert isinstance(event, BlockRemoved) and not set(event.block_hashes) & tail_hashes
    assert env.cache.total_swa_pages() == len(tails)
    assert env.cache.evict_swa(5, keep_tails=True) == 0
    # both resume points still hit; anything else backs off to 0
    assert env.cache.match(prompt + [9, 9, 9, 9]).safe_len == 64
    assert env.cache.match(finished + out[16:]).safe_len == 80
    assert env.cache.match(prompt[:48]).safe_len == 0
    # past the limit, tails go too
    assert env.cache.evict_swa(1) == 1
    assert env.cache.total_swa_pages() == len(tails) - 1
    env.cache.check_invariants()


def test_insert_without_retention() -> None:
    env = Env(page_size=4, window=8)
    full = env.full.alloc(16)
    swa = env.swa.alloc(16)
    env.cache.insert(SEQ, full, list(swa), retain=False)  # an intermediate prefill chunk
    assert env.cache.evictable_swa_pages(include_tails=False) == 16
    env.cache.insert(SEQ, full, list(swa))  # the prompt end, same pages: only the mark changes
    assert env.cache.evictable_swa_pages(include_tails=False) == 14
    assert env.full.decref(full) == 0 and env.swa.decref(swa) == 0
    env.cache.check_invariants()


def test_branch_point_is_a_retention_point() -> None:
    env = Env(page_size=4, window=8)
    system = SEQ[:32]
    env.put(system + [1] * 32)
    env.put(system + [2] * 32)
    env.cache.evict_swa(10**6, keep_tails=True)
    # a third request with the same system prompt resumes at the shared prefix
    m = env.cache.match(system + [3] * 32)
    assert (m.safe_len, m.raw_len) == (32, 32)
    assert env.cache.total_swa_pages() == 3 * 2  # two insert ends and the branch point
    # removing one branch leaves the shared prefix a plain inner run again
    env.cache.evict_full(8)
    assert env.cache.evictable_swa_pages(include_tails=False) == 2
    env.cache.check_invariants()


@pytest.mark.parametrize(
    ("page_size", "window", "ends", "pages_left"),
    [
        (16, 128, [10_000], 8),  # ceil(128 / 16) per retention point
        (16, 128, [10_000, 10_500], 16),  # finish at 10,500: cached up to 10,496, itself a point
        (16, 100, [1_000], 7),  # window not a multiple of the page: ceil(100 / 16)
        (16, 8, [160], 1),
        (4, 10, [64, 40], 6),
    ],
)
def test_long_sequence_keeps_one_tail_per_point(
    page_size: int, window: int, ends: list[int], pages_left: int
) -> None:
    env = Env(page_size=page_size, window=window, num_pages=2048)
    tokens = [(7 * i) % 50_000 for i in range(max(ends))]
    for end in ends:
        env.put(tokens[: end - end % page_size])
    before = env.cache.total_swa_pages()
    assert env.cache.evict_swa(10**9, keep_tails=True) == before - pages_left
    assert env.cache.total_swa_pages() == pages_left == env.swa.num_used
    for end in ends:
        aligned = end - end % page_size
        assert env.cache.match(tokens[:end]).safe_len == aligned
    assert env.cache.match(tokens[: ends[0] // 2]).safe_len == 0
    env.cache.check_invariants()


# ---- locks -------------------------------------------------------------------------------------


def test_locks_block_eviction() -> None:
    env = Env(page_size=4, window=8)
    env.put(SEQ)
    m = env.cache.match(SEQ[:40])
    env.cache.lock(m.node)
    assert env.cache.evictable_full_pages() == 6  # [40, 64)
    assert env.cache.evict_full(10**6) == 6
    assert env.cache.total_full_pages() == 10
    # SWA: deep pages of the locked path may go; the lock window [32, 40) may not
    assert env.cache.evictable_swa_pages() == 8
    assert env.cache.evict_swa(10**6) == 8
    assert env.cache.total_swa_pages() == 2
    assert env.cache.match(SEQ[:40]).safe_len == 40
    env.cache.unlock(m.node)
    assert env.cache.evictable_full_pages() == 10 and env.cache.evictable_swa_pages() == 2
    with pytest.raises(ValueError):
        env.cache.unlock(m.node)
    assert env.cache.evict_full(10**6) == 10
    assert env.full.num_used == 0 and env.swa.num_used == 0
    with pytest.raises(ValueError):
        env.cache.lock(m.node)  # evicted
    env.cache.check_invariants()


def test_lock_survives_splits_and_root_locks() -> None:
    env = Env(page_size=4, window=8)
    env.put(SEQ)
    m = env.cache.match(SEQ)
    env.cache.lock(m.node)
    env.cache.lock(env.cache.root)
    env.cache.match(SEQ[:20])  # splits the locked node
    env.put(SEQ[:44] + [0] * 8)  # and again, with a branch
    env.cache.check_invariants()
    assert env.cache.evict_full(10**6) == 2  # only the new branch leaf
    env.cache.unlock(m.node)
    env.cache.unlock(env.cache.root)
    env.cache.check_invariants()
    with pytest.raises(ValueError):
        env.cache.unlock(env.cache.root)
    assert env.cache.evict_full(10**6) == 16


def test_reset() -> None:
    env = Env()
    env.put(SEQ)
    m = env.cache.match(SEQ)
    env.cache.lock(m.node)
    with pytest.raises(RuntimeError):
        env.cache.reset()
    env.cache.unlock(m.node)
    env.events.drain()
    env.cache.reset()
    assert env.events.drain() == [AllCleared()]
    assert env.full.num_used == env.swa.num_used == env.cache.total_full_pages() == 0
    assert env.cache.match(SEQ).raw_len == 0
    env.put(SEQ)
    assert env.cache.match(SEQ).safe_len == 64


# ---- refcounts with running requests -----------------------------------------------------------


def test_refcounts_with_a_running_request() -> None:
    env = Env()
    full = env.full.alloc(16)
    swa = env.swa.alloc(16)
    r = env.cache.insert(SEQ, full, list(swa))
    assert (r.prefix_len_already_cached, r.new_full_pages, r.new_swa_pages) == (0, 16, 16)
    assert all(env.full.refcount(p) == 2 for p in full)  # the request's and the cache's
    # the request has not locked anything: eviction drops the cache's references, frees nothing
    assert env.cache.evict_full(16) == 0
    assert env.full.num_used == 16 and env.cache.total_full_pages() == 0
    env.full.decref(full)
    env.swa.decref(swa)
    assert env.full.num_used == env.swa.num_used == 0


def test_insert_keeps_tree_pages_and_fills_tombstones() -> None:
    env = Env()
    _, tree_full, tree_swa = env.put(SEQ, [i != 7 for i in range(16)])
    # a second request computed the whole sequence itself, into pages of its own
    full = env.full.alloc(16)
    swa = env.swa.alloc(16)
    env.events.drain()
    r = env.cache.insert(SEQ, full, list(swa))
    assert (r.prefix_len_already_cached, r.new_full_pages, r.new_swa_pages) == (64, 0, 1)
    assert [env.full.refcount(p) for p in full] == [1] * 16  # none taken
    assert env.swa.refcount(swa[7]) == 2 and env.swa.refcount(swa[6]) == 1
    assert r.full_pages == tree_full and r.swa_pages == tree_swa[:7] + [swa[7]] + tree_swa[8:]
    hashes = hash_blocks(SEQ, 4)
    assert env.events.drain() == [BlockStored("swa", (hashes[7],), hashes[6], tuple(SEQ[28:32]), 4)]
    m = env.cache.match(SEQ[:32])
    assert m.full_pages == tree_full[:8] and m.swa_pages[-2:] == [tree_swa[6], swa[7]]
    assert env.full.decref(full) == 16 and env.swa.decref(swa) == 15
    env.cache.check_invariants()


@pytest.mark.parametrize(
    ("tokens", "full_n", "swa_n"),
    [(SEQ[:6], 1, 1), (SEQ[:8], 1, 2), (SEQ[:8], 2, 1)],
)
def test_insert_rejects_bad_shapes(tokens: list[int], full_n: int, swa_n: int) -> None:
    env = Env()
    with pytest.raises(ValueError):
        env.cache.insert(tokens, env.full.alloc(full_n), list(env.swa.alloc(swa_n)))
    assert env.cache.total_full_pages() == 0


def test_insert_rejects_free_and_repeated_pages() -> None:
    env = Env()
    env.put(SEQ[:8])
    with pytest.raises(ValueError):
        env.cache.insert(SEQ[:12], env.full.alloc(3), [None, None, 200])
    (page,) = env.full.alloc(1)
    with pytest.raises(ValueError):
        env.cache.insert(SEQ[:8], [page, page], [None, None])
    (swa_page,) = env.swa.alloc(1)
    with pytest.raises(ValueError):
        env.cache.insert(SEQ[:8], env.full.alloc(2), [swa_page, swa_page])
    assert env.cache.total_full_pages() == 2 and env.cache.total_swa_pages() == 2


# ---- LRU ---------------------------------------------------------------------------------------


def test_evict_full_is_lru_over_leaves() -> None:
    env = Env()
    a, b, c = ([k] * 16 for k in (1, 2, 3))
    for seq in (a, b, c):
        env.put(seq)
    env.cache.match(a)
    assert env.cache.evict_full(1) == 4
    assert [env.cache.match(s).raw_len for s in (a, b, c)] == [16, 0, 16]
    # c[:8] becomes a branch with two 2-page leaves, both older than a
    env.put(c[:8] + [4] * 8)
    env.cache.match(a)
    assert env.cache.evict_full(4) == 4
    assert [env.cache.match(s).raw_len for s in (a, c, c[:8] + [4] * 8)] == [16, 8, 8]
    # a parent left childless is a leaf like any other, ordered by its own last use
    env.cache.match(a)
    assert env.cache.evict_full(1) == 2
    assert [env.cache.match(s).raw_len for s in (a, c)] == [16, 0]


# ---- events ------------------------------------------------------------------------------------


def test_events_for_every_page() -> None:
    env = Env()
    tokens = SEQ[:12]
    h = hash_blocks(tokens, 4)
    env.put(tokens, [True, False, True])
    assert env.events.drain() == [
        BlockStored("full", tuple(h), ROOT_HASH, tuple(tokens), 4),
        BlockStored("swa", (h[0],), ROOT_HASH, tuple(tokens[:4]), 4),
        BlockStored("swa", (h[2],), h[1], tuple(tokens[8:12]), 4),
    ]
    other = tokens[:8] + [0, 0, 0, 0]
    h2 = hash_blocks(other, 4)[2]
    env.put(other)  # fills the tombstone at page 1 on its way
    assert env.events.drain() == [
        BlockStored("swa", (h[1],), h[0], tuple(tokens[4:8]), 4),
        BlockStored("full", (h2,), h[1], (0, 0, 0, 0), 4),
        BlockStored("swa", (h2,), h[1], (0, 0, 0, 0), 4),
    ]
    env.cache.match(other)
    assert env.cache.evict_full(1) == 1
    assert env.events.drain() == [BlockRemoved("swa", (h[2],)), BlockRemoved("full", (h[2],))]
    assert env.cache.evict_swa(10) == 3
    removed = env.events.drain()
    assert all(isinstance(e, BlockRemoved) and e.kind == "swa" for e in removed)
    assert {b for e in removed if isinstance(e, BlockRemoved) for b in e.block_hashes} == {h[0], h[1], h2}


def test_extras_key_the_tree_and_the_hashes() -> None:
    env = Env()
    tokens = SEQ[:12]
    extras: list[bytes | None] = [None, b"image-1", None]
    full = env.full.alloc(3)
    env.cache.insert(tokens, full, [None, None, None], extras=extras)
    env.full.decref(full)
    stored = env.events.drain()
    assert isinstance(stored[0], BlockStored)
    assert list(stored[0].block_hashes) == hash_blocks(tokens, 4, extras)
    assert env.cache.match(tokens, extras=extras).raw_len == 12
    assert env.cache.match(tokens).raw_len == 4  # same tokens, no image: only page 0
    assert env.cache.match(tokens, extras=[None, b"image-2", None]).raw_len == 4


