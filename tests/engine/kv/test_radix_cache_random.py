"""The radix cache against a plain reference model, over random insert / match / evict / lock sequences."""

import random
from collections.abc import Sequence

import pytest

from services.common.block_hash import BlockHash, hash_block, hash_blocks
from services.common.kv_events import AllCleared, BlockRemoved, BlockStored, KVEvent
from services.engine.kv.radix_cache import MatchResult, RadixCache
from tests.engine.kv.radix_env import Env

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
        full, swa = env.cache.block_hashes()  # the snapshot a publisher resyncs with
        assert (len(full), len(swa)) == (len(set(full)), len(set(swa)))
        assert {"full": set(full), "swa": set(swa)} == self.view.blocks
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
