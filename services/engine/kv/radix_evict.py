"""Eviction for RadixCache, and an O(size) consistency check of its incremental counts.

Full eviction removes whole unlocked leaves, least recently used first (ties: deeper first); a
parent left childless and unlocked becomes a candidate in the same pass. SWA eviction turns SWA
pages into tombstones in class order DEEP (outside every retention and lock window), then TAIL
(inside a retention window), never LOCKED (inside a lock window); within a class, least recently
used nodes first, and within a node, the earliest page first.

Both drop the cache's reference on what they evict; the pool frees a page only if nobody else
holds it, and the returned count is what the pool actually freed. Cost per call: one pass over
the nodes plus the pages evicted (the heap is O(leaves log leaves)).
"""

from __future__ import annotations

import heapq
from typing import Protocol

from services.common.block_hash import ROOT_HASH, hash_block
from services.common.kv_events import BlockRemoved, KVEvent
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_node import DEEP, TAIL, RadixNode, window_pages


class EvictableCache(Protocol):
    """The radix cache as eviction sees it: its tree, pools and incremental counts.

    radix_cache.RadixCache is the one implementation; it imports this module, so this one names
    what it needs structurally instead of importing it back.
    """

    page_size: int
    window: int
    full_pool: PagePool
    swa_pool: PagePool
    root: RadixNode
    nodes: set[RadixNode]
    _total_full: int
    _locked_full: int
    _swa_count: list[int]
    _num_locks: int

    def _count_swa(self, node: RadixNode, cls: int, delta: int) -> None: ...

    def _sync_point(self, node: RadixNode) -> None: ...

    def _emit(self, event: KVEvent) -> None: ...


def _leaf_entry(n: RadixNode) -> tuple[int, int, int, RadixNode]:
    return (n.last_access, -n.start, n.uid, n)


def evict_full(cache: EvictableCache, num_pages: int) -> int:
    if num_pages <= 0:
        return 0
    heap = [_leaf_entry(n) for n in cache.nodes if not n.children and n.lock_ref == 0]
    heapq.heapify(heap)
    freed = 0
    while freed < num_pages and heap:
        node = heapq.heappop(heap)[-1]
        parent = node.parent
        assert parent is not None
        freed += _remove_leaf(cache, node)
        if not parent.is_root and not parent.children and parent.lock_ref == 0:
            heapq.heappush(heap, _leaf_entry(parent))
    return freed


def _remove_leaf(cache: EvictableCache, node: RadixNode) -> int:
    """Drop an unlocked leaf and the cache's references to its pages; returns full pages freed."""
    parent = node.parent
    assert parent is not None and not node.children and node.lock_ref == 0
    node.retain = False
    cache._sync_point(node)  # a childless node without a mark is no retention point
    present = [i for i, s in enumerate(node.swa_pages) if s is not None]
    for i in present:
        cls = node.swa_class(i)
        assert cls is not None
        cache._count_swa(node, cls, -1)
    cache.swa_pool.decref([s for s in node.swa_pages if s is not None])
    if present:
        cache._emit(BlockRemoved(kind="swa", block_hashes=tuple(node.hashes[i] for i in present)))
    freed = cache.full_pool.decref(node.full_pages)
    cache._total_full -= node.num_pages
    cache._emit(BlockRemoved(kind="full", block_hashes=tuple(node.hashes)))
    del parent.children[node.page_keys[0]]
    cache.nodes.remove(node)
    node.detached = True
    cache._sync_point(parent)  # it may have stopped being a branch point
    return freed


def evict_swa(cache: EvictableCache, num_pages: int, keep_tails: bool) -> int:
    freed = 0
    for cls in (DEEP,) if keep_tails else (DEEP, TAIL):
        if freed >= num_pages:
            break
        nodes = [n for n in cache.nodes if n.swa_class_count[cls]]
        nodes.sort(key=lambda n: (n.last_access, n.start, n.uid))
        for node in nodes:
            if freed >= num_pages:
                break
            gone: list[int] = []
            for i in range(node.num_pages):
                if freed >= num_pages:
                    break
                page = node.swa_pages[i]
                if page is not None and node.swa_class(i) == cls:
                    node.swa_pages[i] = None
                    cache._count_swa(node, cls, -1)
                    freed += cache.swa_pool.decref([page])
                    gone.append(i)
            if gone:
                cache._emit(BlockRemoved(kind="swa", block_hashes=tuple(node.hashes[i] for i in gone)))
    return freed


def check_invariants(cache: EvictableCache) -> None:
    """Raise AssertionError where the tree and the cache's counts disagree."""
    ps = cache.page_size
    seen: list[RadixNode] = []
    stack = [cache.root]
    while stack:
        n = stack.pop()
        child_locks = 0
        for key, c in n.children.items():
            assert c.parent is n and not c.detached, c
            assert c.num_pages > 0 and key == c.page_keys[0], c
            assert c.start == n.end and c.end == c.start + c.num_pages * ps, c
            assert len(c.full_pages) == len(c.swa_pages) == len(c.hashes) == c.num_pages, c
            assert len(c.tail_refs) == len(c.swa_locks) == c.num_pages, c
            h = n.hashes[-1] if n.hashes else ROOT_HASH
            for i, (tokens, extra) in enumerate(c.page_keys):
                assert len(tokens) == ps
                h = hash_block(h, tokens, extra)
                assert c.hashes[i] == h, (c, i)
            child_locks += c.lock_ref
            seen.append(c)
            stack.append(c)
        assert n.lock_ref >= child_locks, n
    assert set(seen) == cache.nodes and len(seen) == len(cache.nodes)
    assert cache.root.lock_ref == cache._num_locks

    tail_refs = {n: [0] * n.num_pages for n in seen}
    swa_locks = {n: [0] * n.num_pages for n in seen}
    for n in seen:
        is_point = n.retain or len(n.children) >= 2
        assert n.point_applied == is_point, n
        own_locks = n.lock_ref - sum(c.lock_ref for c in n.children.values())
        for m, i in window_pages(n, cache.window, ps):
            tail_refs[m][i] += int(is_point)
            swa_locks[m][i] += own_locks

    full_ids: list[int] = []
    swa_ids: list[int] = []
    counts = [0, 0, 0]
    locked_full = 0
    for n in seen:
        assert n.tail_refs == tail_refs[n], (n, n.tail_refs, tail_refs[n])
        assert n.swa_locks == swa_locks[n], (n, n.swa_locks, swa_locks[n])
        node_counts = [0, 0, 0]
        for i in range(n.num_pages):
            cls = n.swa_class(i)
            if cls is not None:
                node_counts[cls] += 1
        assert n.swa_class_count == node_counts, n
        counts = [a + b for a, b in zip(counts, node_counts, strict=True)]
        locked_full += n.num_pages if n.lock_ref else 0
        full_ids += n.full_pages
        swa_ids += [s for s in n.swa_pages if s is not None]
    assert cache._swa_count == counts
    assert cache._total_full == len(full_ids) and cache._locked_full == locked_full
    assert len(set(full_ids)) == len(full_ids), "a full page indexed twice"
    assert len(set(swa_ids)) == len(swa_ids), "an SWA page indexed twice"
    assert all(cache.full_pool.refcount(p) >= 1 for p in full_ids)
    assert all(cache.swa_pool.refcount(p) >= 1 for p in swa_ids)
