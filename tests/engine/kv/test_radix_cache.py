import random
from collections.abc import Sequence

import pytest

from services.common.block_hash import ROOT_HASH, BlockHash, hash_block, hash_blocks
from services.engine.kv.events import AllCleared, BlockRemoved, BlockStored, EventBuffer, KVEvent
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import InsertResult, MatchResult, RadixCache


class Env:
    """A cache over two fresh pools, and a helper playing a request that computed everything."""

    def __init__(self, page_size: int = 4, window: int = 8, num_pages: int = 256) -> None:
        self.ps = page_size
        self.full = PagePool(num_pages, page_size, "full")
        self.swa = PagePool(num_pages, page_size, "swa")
        self.events = EventBuffer()
        self.cache = RadixCache(page_size, window, self.full, self.swa, self.events)

    def put(
        self, tokens: Sequence[int], swa_mask: Sequence[bool] | None = None
    ) -> tuple[InsertResult, list[int], list[int | None]]:
        """Allocate pages for all of tokens, insert them, drop the request's references."""
        n = len(tokens) // self.ps
        full = self.full.alloc(n)
        swa_alloc = self.swa.alloc(n)
        swa: list[int | None] = [
            s if swa_mask is None or swa_mask[i] else None for i, s in enumerate(swa_alloc)
        ]
        result = self.cache.insert(tokens, full, swa)
        self.full.decref(full)
        self.swa.decref(swa_alloc)
        self.cache.check_invariants()
        return result, full, swa


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


# ---- randomized: the cache against a reference model -------------------------------------------


Prefix = tuple[int, ...]


class Reference:
    """Which page-aligned prefixes have full / SWA KV cached, and in which pages: a dict per kind
    from the prefix ending at a page to the page id."""

    def __init__(self, page_size: int, window: int) -> None:
        self.ps, self.window = page_size, window
        self.full: dict[Prefix, int] = {}
        self.swa: dict[Prefix, int] = {}
        self.ends: set[Prefix] = set()
        self.hash_of: dict[Prefix, BlockHash] = {}
        self.prefix_of: dict[BlockHash, Prefix] = {}

    def prefix(self, tokens: Sequence[int], page: int) -> Prefix:
        return tuple(tokens[: (page + 1) * self.ps])

    def window_prefixes(self, point: Prefix) -> set[Prefix]:
        lo = max(0, len(point) - self.window) // self.ps
        return {self.prefix(point, j) for j in range(lo, len(point) // self.ps)}

    def insert(
        self, tokens: Sequence[int], full: list[int], swa: list[int | None], retain: bool
    ) -> tuple[int, int, int]:
        n = len(tokens) // self.ps
        hashes = hash_blocks(tokens, self.ps)
        already = sum(self.prefix(tokens, i) in self.full for i in range(n))
        new_swa = 0
        for i in range(n):
            p = self.prefix(tokens, i)
            self.hash_of[p], self.prefix_of[hashes[i]] = hashes[i], p
            self.full.setdefault(p, full[i])
            if swa[i] is not None and p not in self.swa:
                self.swa[p] = swa[i]  # type: ignore[assignment]
                new_swa += 1
        if n and retain:
            self.ends.add(tuple(tokens))
        return already * self.ps, n - already, new_swa

    def match(self, tokens: Sequence[int]) -> tuple[int, int, list[int], list[int | None]]:
        n = len(tokens) // self.ps
        raw = 0
        while raw < n and self.prefix(tokens, raw) in self.full:
            raw += 1
        for safe in range(raw, -1, -1):
            lo = max(0, safe * self.ps - self.window) // self.ps
            if all(self.prefix(tokens, j) in self.swa for j in range(lo, safe)):
                break
        full = [self.full[self.prefix(tokens, j)] for j in range(safe)]
        swa = [self.swa[self.prefix(tokens, j)] if j >= lo else None for j in range(safe)]
        return safe * self.ps, raw * self.ps, full, swa

    def protected(self, locks: list[Prefix]) -> tuple[set[Prefix], set[Prefix], set[Prefix]]:
        """(full prefixes on locked paths, SWA prefixes in lock windows, SWA prefixes in tails)."""
        children: dict[Prefix, int] = {}
        for p in self.full:
            parent = p[: -self.ps]
            children[parent] = children.get(parent, 0) + 1
        points = {p for p in self.full if p in self.ends or children.get(p, 0) >= 2}
        tails = set().union(*(self.window_prefixes(p) for p in points))
        locked_full = {lk[: (j + 1) * self.ps] for lk in locks for j in range(len(lk) // self.ps)}
        locked_swa = set().union(*(self.window_prefixes(lk) for lk in locks))
        return locked_full, locked_swa, tails

    def apply_removals(self, events: list[KVEvent]) -> None:
        for e in events:
            if isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    p = self.prefix_of[h]
                    if e.kind == "full":
                        assert p not in self.swa, "SWA removal must precede full removal"
                        del self.full[p]
                        self.ends.discard(p)
                    else:
                        del self.swa[p]


class EventView:
    """What a router rebuilds from the events alone."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[BlockHash]] = {"full": set(), "swa": set()}

    def apply(self, events: list[KVEvent]) -> None:
        for e in events:
            if isinstance(e, AllCleared):
                self.blocks = {"full": set(), "swa": set()}
            elif isinstance(e, BlockStored):
                parent = e.parent_hash
                for i, h in enumerate(e.block_hashes):
                    assert hash_block(parent, e.block_tokens(i)) == h
                    assert h not in self.blocks[e.kind]
                    self.blocks[e.kind].add(h)
                    parent = h
            elif isinstance(e, BlockRemoved):
                for h in e.block_hashes:
                    self.blocks[e.kind].remove(h)


class Holder:
    def __init__(self, m: MatchResult, tokens: Prefix) -> None:
        self.m, self.prefix = m, tokens[: m.safe_len]
        self.swa = [s for s in m.swa_pages if s is not None]


def tree_contents(cache: RadixCache) -> tuple[dict[Prefix, int], dict[Prefix, int]]:
    full: dict[Prefix, int] = {}
    swa: dict[Prefix, int] = {}
    for node in cache.nodes:
        tokens = [t for n in node.path() for t in n.token_ids()]
        for i in range(node.num_pages):
            p = tuple(tokens[: node.start + (i + 1) * cache.page_size])
            full[p] = node.full_pages[i]
            s = node.swa_pages[i]
            if s is not None:
                swa[p] = s
    return full, swa


class Harness:
    def __init__(self, seed: int, page_size: int, window: int) -> None:
        self.rng = random.Random(seed)
        self.env = Env(page_size, window, num_pages=48)
        self.ref = Reference(page_size, window)
        self.view = EventView()
        self.holders: list[Holder] = []
        self.docs = [[self.rng.randrange(3) for _ in range(12 * page_size)] for _ in range(3)]

    def random_tokens(self) -> list[int]:
        ps = self.env.ps
        tokens = list(self.rng.choice(self.docs))[: self.rng.randrange(0, 13) * ps]
        if tokens and self.rng.random() < 0.4:
            tokens[self.rng.randrange(len(tokens))] = self.rng.randrange(3)
        return tokens

    def step(self) -> None:
        op = self.rng.choices(["insert", "start", "finish", "match", "evict_full", "evict_swa", "reset"],
                              [5, 2, 2, 3, 2, 3, 0.1])[0]  # fmt: skip
        getattr(self, "op_" + op)()
        self.check()

    def start(self, tokens: list[int]) -> Holder:
        cache = self.env.cache
        want = self.ref.match(tokens)
        m = cache.match(tokens)
        assert (m.safe_len, m.raw_len, m.full_pages, m.swa_pages) == want
        assert m.node.end == m.safe_len
        cache.lock(m.node)
        h = Holder(m, tuple(tokens))
        self.env.full.incref(m.full_pages)
        self.env.swa.incref(h.swa)
        return h

    def finish(self, h: Holder) -> None:
        self.env.cache.unlock(h.m.node)
        self.env.full.decref(h.m.full_pages)
        self.env.swa.decref(h.swa)

    def op_insert(self) -> None:
        """A request: match, lock, compute the rest into new pages, insert, release."""
        env, ps = self.env, self.env.ps
        tokens = self.random_tokens()
        h = self.start(tokens)
        self.holders.append(h)
        n, k = len(tokens) // ps, h.m.safe_len // ps
        if env.full.num_free < n - k:
            self.evict_full(n - k - env.full.num_free)
        keep = [i >= n - 2 or self.rng.random() < 0.5 for i in range(k, n)]
        if env.full.num_free < n - k or env.swa.num_free < sum(keep):
            self.holders.pop()
            self.finish(h)
            return
        new_full = env.full.alloc(n - k)
        new_swa = iter(env.swa.alloc(sum(keep)))
        swa = list(h.m.swa_pages) + [next(new_swa) if kept else None for kept in keep]
        full = h.m.full_pages + new_full
        retain = self.rng.random() < 0.8
        want = self.ref.insert(tokens, full, swa, retain)
        r = env.cache.insert(tokens, full, swa, retain=retain)
        assert (r.prefix_len_already_cached, r.new_full_pages, r.new_swa_pages) == want
        assert r.full_pages == [self.ref.full[self.ref.prefix(tokens, i)] for i in range(n)]
        assert r.swa_pages == [self.ref.swa.get(self.ref.prefix(tokens, i)) for i in range(n)]
        assert r.node.end == len(tokens)
        env.full.decref(new_full)
        env.swa.decref([s for s in swa[k:] if s is not None])
        self.holders.pop()
        self.finish(h)

    def op_start(self) -> None:
        self.holders.append(self.start(self.random_tokens()))

    def op_finish(self) -> None:
        if self.holders:
            self.finish(self.holders.pop(self.rng.randrange(len(self.holders))))

    def op_match(self) -> None:
        tokens = self.random_tokens()
        m = self.env.cache.match(tokens)
        assert (m.safe_len, m.raw_len, m.full_pages, m.swa_pages) == self.ref.match(tokens)

    def op_evict_full(self) -> None:
        self.evict_full(self.rng.randint(1, 8))

    def evict_full(self, n: int) -> None:
        env = self.env
        locked_full, _, _ = self.ref.protected([h.prefix for h in self.holders])
        evictable = env.cache.evictable_full_pages()
        before_free, before = env.full.num_free, set(self.ref.full)
        freed = env.cache.evict_full(n)
        assert freed == env.full.num_free - before_free
        assert freed >= min(n, evictable)
        self.sync_events()
        removed = before - set(self.ref.full)
        assert not removed & locked_full
        assert all(p[: -env.ps] in self.ref.full for p in self.ref.full if len(p) > env.ps)

    def op_evict_swa(self) -> None:
        env, n, keep_tails = self.env, self.rng.randint(1, 8), self.rng.random() < 0.5
        _, locked_swa, tails = self.ref.protected([h.prefix for h in self.holders])
        evictable = env.cache.evictable_swa_pages(include_tails=not keep_tails)
        before_free, before = env.swa.num_free, set(self.ref.swa)
        freed = env.cache.evict_swa(n, keep_tails=keep_tails)
        assert freed == env.swa.num_free - before_free == min(n, evictable)
        self.sync_events()
        removed = before - set(self.ref.swa)
        assert len(removed) == freed and not removed & locked_swa
        if keep_tails:
            assert not removed & tails
        if removed & tails:  # tails only once no deep page is left
            assert not set(self.ref.swa) - tails - locked_swa

    def op_reset(self) -> None:
        if not self.holders:
            self.env.cache.reset()
            self.ref = Reference(self.env.ps, self.ref.window)

    def sync_events(self) -> None:
        events = self.env.events.drain()
        self.ref.apply_removals(events)
        self.view.apply(events)

    def check(self) -> None:
        env, ref = self.env, self.ref
        self.sync_events()
        env.cache.check_invariants()
        assert tree_contents(env.cache) == (ref.full, ref.swa)
        assert self.view.blocks == {
            "full": {ref.hash_of[p] for p in ref.full},
            "swa": {ref.hash_of[p] for p in ref.swa},
        }
        locked_full, locked_swa, tails = ref.protected([h.prefix for h in self.holders])
        assert env.cache.total_full_pages() == len(ref.full)
        assert env.cache.total_swa_pages() == len(ref.swa)
        assert env.cache.evictable_full_pages() == len(set(ref.full) - locked_full)
        assert env.cache.evictable_swa_pages() == len(set(ref.swa) - locked_swa)
        assert env.cache.evictable_swa_pages(include_tails=False) == len(set(ref.swa) - locked_swa - tails)
        # every reference in the pools is held by the cache or by a running request
        for pool, cached, held in (
            (env.full, ref.full.values(), [p for h in self.holders for p in h.m.full_pages]),
            (env.swa, ref.swa.values(), [p for h in self.holders for p in h.swa]),
        ):
            expected = [0] * pool.num_pages
            for p in [*cached, *held]:
                expected[p] += 1
            assert [pool.refcount(p) for p in range(pool.num_pages)] == expected


@pytest.mark.parametrize(("page_size", "window"), [(1, 3), (2, 4), (2, 5), (4, 8), (4, 0), (2, 16)])
@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_model(seed: int, page_size: int, window: int) -> None:
    harness = Harness(seed, page_size, window)
    for _ in range(250):
        harness.step()
    while harness.holders:
        harness.op_finish()
    harness.evict_full(10**6)
    harness.check()
    assert harness.env.full.num_used == harness.env.swa.num_used == 0
