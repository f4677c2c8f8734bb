"""The window-safe radix prefix cache of a hybrid SWA model, at page granularity.

Keys are token ids cut into whole pages; each node carries one full-attention page and one SWA
page (or None, a tombstone) per page. Resuming a sequence at prefix length L needs

    full KV  [0, L)                 every page of the path
    SWA KV   [L - window, L)        only the pages overlapping the window (clamped at 0)

    0                         L - window        L
    |==========full============|=====full=======|
                               |~~~~~~SWA~~~~~~~|

so `match` reports as a hit only the longest page-aligned L whose window is all present (raw
matching tokens are never hits), and SWA pages far from any resume point are what
`evict_swa` drops first.

Ownership. The cache holds exactly one pool reference on every page it indexes. `match` takes
none for the caller; the caller increfs what it keeps, `lock`s the returned node while it runs
(locked nodes are never evicted, and neither are SWA pages within `window` of a lock point) and
unlocks it when done. `insert` increfs only the pages it newly indexes; the caller keeps its own
references either way and drops them as usual.

Retention points. Every insert end is a tail checkpoint (where a prompt ended or a request
finished: the next turn resumes at one of them), and so is every branch point (a node with two or
more children: the end of a shared prefix). The SWA pages within `window` of a retention point are
evicted only after every other unlocked SWA page.

Eviction lives in radix_evict.py; the node and the window walk in radix_node.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.common.block_hash import ROOT_HASH, BlockHash, hash_block
from services.common.kv_events import AllCleared, KVEvent, KVKind
from services.engine.kv import radix_evict
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_node import (
    DEEP,
    TAIL,
    PageKey,
    RadixNode,
    common_pages,
    safe_prefix_pages,
    stored_events,
    window_pages,
)


@dataclass(frozen=True)
class MatchResult:
    """A window-safe hit: KV for [0, safe_len) can be reused as is.

    `full_pages` has safe_len // page_size ids; `swa_pages` as many entries, ids for the pages
    overlapping [safe_len - window, safe_len) and None before. `node` ends exactly at safe_len
    (the root if 0): lock it while using the pages. `raw_len` >= safe_len is how far the full KV
    alone would match; only for metrics and for deciding to recompute."""

    safe_len: int
    raw_len: int
    full_pages: list[int]
    swa_pages: list[int | None]
    node: RadixNode


@dataclass(frozen=True)
class InsertResult:
    """`prefix_len_already_cached` tokens were in the tree (its pages kept, the caller's not taken);
    `new_full_pages` / `new_swa_pages` pages were newly indexed (one reference taken on each, SWA
    tombstones filled included). `node` ends at the insert end. `full_pages` / `swa_pages` are
    the tree's page ids for every inserted page after the insert: where they differ from the
    caller's, the caller may swap its duplicate for the tree's page (incref theirs, decref its own)."""

    prefix_len_already_cached: int
    new_full_pages: int
    new_swa_pages: int
    node: RadixNode
    full_pages: list[int]
    swa_pages: list[int | None]


class RadixCache:
    def __init__(
        self,
        page_size: int,
        window: int,
        full_pool: PagePool,
        swa_pool: PagePool,
        event_sink: Callable[[KVEvent], None] | None = None,
    ) -> None:
        if page_size <= 0 or window < 0:
            raise ValueError(f"bad cache shape: page_size={page_size}, window={window}")
        for pool in (full_pool, swa_pool):
            if pool.page_size != page_size:
                raise ValueError(f"pool {pool.name!r} has page size {pool.page_size}, cache {page_size}")
        self.page_size = page_size
        self.window = window
        self.full_pool = full_pool
        self.swa_pool = swa_pool
        self.event_sink = event_sink
        self._tick = 0
        self._next_uid = 1
        self._clear_state()

    def _clear_state(self) -> None:
        self.root = RadixNode(0, None, 0, 0, [], [], [], [])
        self.nodes: set[RadixNode] = set()  # every node but the root
        self._total_full = 0
        self._locked_full = 0  # full pages in nodes with lock_ref > 0
        self._swa_count = [0, 0, 0]  # present SWA pages per class DEEP, TAIL, LOCKED
        self._num_locks = 0

    # ---- sizes ---------------------------------------------------------------------------------

    def total_full_pages(self) -> int:
        return self._total_full

    def total_swa_pages(self) -> int:
        return sum(self._swa_count)

    def evictable_full_pages(self) -> int:
        """Full pages in unlocked nodes: what evict_full can give back (see module doc)."""
        return self._total_full - self._locked_full

    def evictable_swa_pages(self, include_tails: bool = True) -> int:
        """SWA pages outside every lock window: what evict_swa can give back."""
        return self._swa_count[DEEP] + (self._swa_count[TAIL] if include_tails else 0)

    def block_hashes(self) -> tuple[list[BlockHash], list[BlockHash]]:
        """(full, swa) block hashes of every page held now: a KV-event snapshot of this cache."""
        full: list[BlockHash] = []
        swa: list[BlockHash] = []
        for node in self.nodes:
            full += node.hashes
            swa += [h for h, page in zip(node.hashes, node.swa_pages, strict=True) if page is not None]
        return full, swa

    # ---- match ---------------------------------------------------------------------------------

    def match(self, tokens: Sequence[int], extras: Sequence[bytes | None] | None = None) -> MatchResult:
        """The longest window-safe cached prefix of `tokens` (whole pages only).

        Splits a node so the hit ends on a node boundary and marks the hit path recently used.
        To keep at least one token to compute, pass the prompt without its last token."""
        keys = self._page_keys(tokens, extras)
        walk: list[tuple[RadixNode, int]] = []  # (node, pages of it matched)
        node, k = self.root, 0
        while k < len(keys):
            child = node.children.get(keys[k])
            if child is None:
                break
            m = common_pages(child.page_keys, keys, k)
            walk.append((child, m))
            k += m
            if m < child.num_pages:
                break
            node = child
        swa = [s for n, m in walk for s in n.swa_pages[:m]]
        safe = safe_prefix_pages(swa, self.window, self.page_size)
        hit = self.root
        done = 0
        for n, m in walk:
            if done >= safe:
                break
            take = min(m, safe - done)
            hit = self._split(n, take) if take < n.num_pages else n
            done += take
        self._tick += 1
        path = hit.path()
        for n in path:
            n.last_access = self._tick
        full_pages = [p for n in path for p in n.full_pages]
        first = max(0, safe * self.page_size - self.window) // self.page_size
        swa_pages: list[int | None] = [None] * first
        swa_pages += swa[first:safe]
        return MatchResult(safe * self.page_size, k * self.page_size, full_pages, swa_pages, hit)

    # ---- insert --------------------------------------------------------------------------------

    def insert(
        self,
        tokens: Sequence[int],
        full_pages: list[int],
        swa_pages: list[int | None],
        extras: Sequence[bytes | None] | None = None,
        retain: bool = True,
    ) -> InsertResult:
        """Index `tokens` (page-aligned) with one full page and one SWA page or None per page.

        Positions the tree already has keep the tree's pages (a tombstone there is filled with
        the caller's SWA page, if given); the rest become a new leaf. The end becomes a tail
        checkpoint unless `retain` is False (for inserts at points nobody resumes from, such
        as intermediate prefill chunks)."""
        ps = self.page_size
        if len(tokens) % ps:
            raise ValueError(f"insert of {len(tokens)} tokens: not a multiple of page size {ps}")
        n_pages = len(tokens) // ps
        if len(full_pages) != n_pages or len(swa_pages) != n_pages:
            raise ValueError(f"{n_pages} pages of tokens, {len(full_pages)} full, {len(swa_pages)} swa ids")
        given_swa = [s for s in swa_pages if s is not None]
        if len(set(full_pages)) < n_pages or len(set(given_swa)) < len(given_swa):
            raise ValueError("a page id appears twice in one insert")
        for p in full_pages:
            if self.full_pool.refcount(p) == 0:
                raise ValueError(f"full page {p} is free")
        for s in given_swa:
            if self.swa_pool.refcount(s) == 0:
                raise ValueError(f"swa page {s} is free")
        keys = self._page_keys(tokens, extras)
        self._tick += 1
        node, k, new_swa = self.root, 0, 0
        while k < n_pages:
            child = node.children.get(keys[k])
            if child is None:
                break
            m = common_pages(child.page_keys, keys, k)
            if m < child.num_pages:
                child = self._split(child, m)
            new_swa += self._fill_swa(child, swa_pages[k : k + m])
            child.last_access = self._tick
            node, k = child, k + m
        cached = k
        if k < n_pages:
            node = self._add_leaf(node, keys[k:], full_pages[k:], swa_pages[k:])
            new_swa += sum(s is not None for s in swa_pages[k:])
        if retain and not node.is_root:
            node.retain = True
            self._sync_point(node)
        path = node.path()
        tree_full = [p for n in path for p in n.full_pages]
        tree_swa = [s for n in path for s in n.swa_pages]
        return InsertResult(cached * ps, n_pages - cached, new_swa, node, tree_full, tree_swa)

    def _add_leaf(
        self, parent: RadixNode, keys: list[PageKey], full: list[int], swa: list[int | None]
    ) -> RadixNode:
        h = parent.hashes[-1] if parent.hashes else ROOT_HASH
        hashes: list[BlockHash] = []
        for key in keys:
            h = hash_block(h, key[0], key[1])
            hashes.append(h)
        start = parent.end
        leaf = RadixNode(
            self._new_uid(),
            parent,
            start,
            start + len(keys) * self.page_size,
            keys,
            list(full),
            list(swa),
            hashes,
        )
        leaf.last_access = self._tick
        parent.children[keys[0]] = leaf
        self.nodes.add(leaf)
        self.full_pool.incref(full)
        self._total_full += len(full)
        self._emit_stored("full", leaf, range(leaf.num_pages))
        present = [i for i, s in enumerate(swa) if s is not None]
        self.swa_pool.incref([s for s in swa if s is not None])
        for _ in present:
            self._count_swa(leaf, DEEP, +1)
        self._emit_stored("swa", leaf, present)
        self._sync_point(parent)  # it may have become a branch point
        return leaf

    def _fill_swa(self, node: RadixNode, swa: Sequence[int | None]) -> int:
        filled = [i for i, s in enumerate(swa) if s is not None and node.swa_pages[i] is None]
        for i in filled:
            page = swa[i]
            assert page is not None
            self.swa_pool.incref([page])
            node.swa_pages[i] = page
            cls = node.swa_class(i)
            assert cls is not None
            self._count_swa(node, cls, +1)
        self._emit_stored("swa", node, filled)
        return len(filled)

    # ---- locks ---------------------------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect root..node from eviction, and the SWA pages within `window` of node.end."""
        if node.detached:
            raise ValueError(f"{node} is no longer in the cache")
        for n in [*node.path(), self.root]:
            n.lock_ref += 1
            if n.lock_ref == 1:
                self._locked_full += n.num_pages
        for n, i in window_pages(node, self.window, self.page_size):
            self._guard(n, i, "swa_locks", +1)
        self._num_locks += 1

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`; raises ValueError if node holds no lock."""
        if node.lock_ref <= 0 or node.detached:
            raise ValueError(f"unlock of {node}, which is not locked")
        for n in [*node.path(), self.root]:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self._locked_full -= n.num_pages
        for n, i in window_pages(node, self.window, self.page_size):
            self._guard(n, i, "swa_locks", -1)
        self._num_locks -= 1

    # ---- eviction (radix_evict.py) ------------------------------------------------------------

    def evict_full(self, num_pages: int) -> int:
        """Evict unlocked leaves, least recently used first, until the full pool has freed
        `num_pages` pages or nothing is left to evict; returns full pages the pool freed. Their
        SWA pages are released too (not counted)."""
        return radix_evict.evict_full(self, num_pages)

    def evict_swa(self, num_pages: int, keep_tails: bool = False) -> int:
        """Tombstone SWA pages until the SWA pool has freed `num_pages`: pages outside every
        retention window first (LRU), then retention tails (unless keep_tails), never lock
        windows. Returns SWA pages the pool freed."""
        return radix_evict.evict_swa(self, num_pages, keep_tails)

    def reset(self) -> None:
        """Drop every page and node and emit AllCleared; raises RuntimeError while locks are held."""
        if self._num_locks:
            raise RuntimeError(f"reset with {self._num_locks} locks held")
        full: list[int] = []
        swa: list[int] = []
        for n in self.nodes:
            full += n.full_pages
            swa += [s for s in n.swa_pages if s is not None]
            n.detached = True
        self.full_pool.decref(full)
        self.swa_pool.decref(swa)
        self._clear_state()
        self._emit(AllCleared())

    def check_invariants(self) -> None:
        """Recount everything from the tree and compare with the incremental counts (O(size))."""
        radix_evict.check_invariants(self)

    # ---- internals -----------------------------------------------------------------------------

    def _page_keys(self, tokens: Sequence[int], extras: Sequence[bytes | None] | None) -> list[PageKey]:
        ps = self.page_size
        n = len(tokens) // ps
        if extras is not None and len(extras) < n:
            raise ValueError(f"{len(extras)} extras for {n} pages")
        return [
            (tuple(tokens[i * ps : (i + 1) * ps]), extras[i] if extras is not None else None)
            for i in range(n)
        ]

    def _new_uid(self) -> int:
        self._next_uid += 1
        return self._next_uid - 1

    def _split(self, node: RadixNode, k: int) -> RadixNode:
        upper = node.split(k, self._new_uid(), self.page_size)
        self.nodes.add(upper)  # same pages, same lock state: the counts do not change
        return upper

    def _count_swa(self, node: RadixNode, cls: int, delta: int) -> None:
        node.swa_class_count[cls] += delta
        self._swa_count[cls] += delta

    def _guard(self, node: RadixNode, i: int, attr: str, delta: int) -> None:
        """Change page i's tail_refs or swa_locks by delta, keeping the class counts right."""
        before = node.swa_class(i)
        getattr(node, attr)[i] += delta
        after = node.swa_class(i)
        if before != after:
            assert before is not None and after is not None
            self._count_swa(node, before, -1)
            self._count_swa(node, after, +1)

    def _sync_point(self, node: RadixNode) -> None:
        """Make tail_refs hold node's window iff node is a retention point."""
        want = not node.is_root and not node.detached and (node.retain or len(node.children) >= 2)
        if want != node.point_applied:
            for n, i in window_pages(node, self.window, self.page_size):
                self._guard(n, i, "tail_refs", +1 if want else -1)
            node.point_applied = want

    def _emit(self, event: KVEvent) -> None:
        if self.event_sink is not None:
            self.event_sink(event)

    def _emit_stored(self, kind: KVKind, node: RadixNode, pages: Sequence[int]) -> None:
        if self.event_sink is not None:
            for event in stored_events(kind, node, pages, self.page_size):
                self.event_sink(event)


__all__ = ["InsertResult", "MatchResult", "RadixCache", "RadixNode"]
