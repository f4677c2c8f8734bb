"""L2, the host-memory tier of the KV cache: which block hashes have which host pages (ids only).

Window-safe, like the radix cache. Two kinds of entries:

    full block   key: the chained block hash of a page      value: one host full page
    SWA tail     key: the block hash of the page a prefix    value: the host SWA pages of the window
                 ends at (its end e is page-aligned)                before e, pages [keep(e)/P, e/P)

with keep(e) = swa_keep_start(e) (req_pages.py): at most ceil(W/P) pages, whatever the length. A
prefix of L pages can be restored from here iff every full page it needs is here and the tail at
L is here; no sequence's whole SWA history is ever stored.

    pages       0   1   2   3   4   5   6   7
    full        [h0][h1][h2][h3][h4][h5][h6][h7]        every page of every prefix written down
    SWA tails                       [t@6 ....]  [t@8 ...]  only at the ends that were written

Eviction is segmented LRU per kind: an entry starts on probation and moves to the protected
segment when a lookup uses it; probation is evicted first. One-shot prefixes (a scan of new
conversations) therefore cannot push out a hot one (a shared system prompt, a long conversation's
turns). The protected segment holds at most PROTECTED_FRACTION of a kind's pages: past that its
least recently used entries go back to probation (so new entries always have room to prove
themselves). Host pages come from two PagePools; services/engine/tensors/host_store.py holds the bytes.

Events (tier "l2", kv/events.py) tell the router what L2 holds: a full block is a "full" event of
its hash, a tail a "swa" event of the hash of the page it ends at, so that an index built with a
one-page window (safe at L iff an "swa" entry exists at page L - 1) says exactly where a restore
can end.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from services.common.block_hash import ROOT_HASH, BlockHash
from services.common.kv_events import BlockRemoved, BlockStored, KVEvent
from services.engine.kv.page_pool import PagePool
from services.engine.kv.req_pages import swa_keep_start


@dataclass(frozen=True)
class HostHit:
    """Pages [start, end) restorable from L2: host full pages for each, and the tail at `end`."""

    start: int  # in pages
    end: int  # in pages, > start
    full: tuple[int, ...]  # host full page of pages start .. end-1
    tail: tuple[int, ...]  # host SWA pages of the window before end, oldest first
    tail_first: int  # logical page index of tail[0] (= swa_keep_start(end * P) / P)


PROTECTED_FRACTION = 0.8


class _Segments:
    """Segmented LRU of one kind: key -> host pages (a tuple). Probation first out; the protected
    segment holds at most `max_protected` pages (overflow is demoted to probation's young end)."""

    def __init__(self, max_protected: int) -> None:
        self.probation: OrderedDict[BlockHash, tuple[int, ...]] = OrderedDict()
        self.protected: OrderedDict[BlockHash, tuple[int, ...]] = OrderedDict()
        self.max_protected = max_protected
        self.protected_pages = 0

    def __len__(self) -> int:
        return len(self.probation) + len(self.protected)

    def get(self, key: BlockHash) -> tuple[int, ...] | None:
        v = self.protected.get(key)
        return v if v is not None else self.probation.get(key)

    def put(self, key: BlockHash, pages: tuple[int, ...]) -> None:
        self.probation[key] = pages

    def promote(self, key: BlockHash) -> None:
        if key in self.protected:
            self.protected.move_to_end(key)
            return
        if key not in self.probation:
            return
        pages = self.protected[key] = self.probation.pop(key)
        self.protected_pages += len(pages)
        while self.protected_pages > self.max_protected and len(self.protected) > 1:
            old, old_pages = self.protected.popitem(last=False)
            self.protected_pages -= len(old_pages)
            self.probation[old] = old_pages

    def pop_victim(self) -> tuple[BlockHash, tuple[int, ...]] | None:
        if self.probation:
            return self.probation.popitem(last=False)
        if self.protected:
            key, pages = self.protected.popitem(last=False)
            self.protected_pages -= len(pages)
            return key, pages
        return None


class HostTier:
    def __init__(
        self,
        full_pages: int,
        swa_pages: int,
        page_size: int,
        window: int,
        event_sink: Callable[[KVEvent], None] | None = None,
    ) -> None:
        self.page_size = page_size
        self.event_sink = event_sink
        self.window = window
        self.full_pool = PagePool(full_pages, page_size, "host-full")
        self.swa_pool = PagePool(swa_pages, page_size, "host-swa")
        self._full = _Segments(int(PROTECTED_FRACTION * full_pages))
        self._tails = _Segments(int(PROTECTED_FRACTION * swa_pages))
        self.evicted_full = 0
        self.evicted_tails = 0

    # -- reads ---------------------------------------------------------------------------------
    def tail_pages(self, end: int) -> int:
        """SWA pages a tail at page `end` holds."""
        p = self.page_size
        return end - swa_keep_start(end * p, p, self.window) // p

    def has_full(self, key: BlockHash) -> bool:
        return self._full.get(key) is not None

    def lookup(self, hashes: Sequence[BlockHash], start: int) -> HostHit | None:
        """The longest restorable run of pages from `start` (hashes[i] = page i's block hash), or None.
        Does not change the LRU order: `use()` does, once the hit is taken."""
        full: list[int] = []
        best: HostHit | None = None
        for i in range(start, len(hashes)):
            page = self._full.get(hashes[i])
            if page is None:
                break
            full.append(page[0])
            tail = self._tails.get(hashes[i])
            if tail is not None:
                end = i + 1
                best = HostHit(start, end, tuple(full), tail, end - len(tail))
        return best

    def use(self, hashes: Sequence[BlockHash], hit: HostHit) -> None:
        """A hit was restored: its entries move to (the young end of) the protected segment."""
        self.protect(hashes[hit.start : hit.end], hashes[hit.end - 1])

    def protect(self, full: Sequence[BlockHash], tail: BlockHash | None = None) -> None:
        """Move these entries to the young end of the protected segment (those that are here)."""
        for key in full:
            self._full.promote(key)
        if tail is not None:
            self._tails.promote(tail)

    # -- writes --------------------------------------------------------------------------------
    def store_full(
        self, key: BlockHash, parent: BlockHash | None = None, tokens: Sequence[int] = ()
    ) -> int | None:
        """A host page for a new full block (evicting as needed), or None if it is here already or
        nothing can be evicted. `parent` and the page's `tokens` go into the stored event."""
        if self._full.get(key) is not None:
            return None
        pages = self._alloc(self.full_pool, self._full, 1)
        if pages is None:
            return None
        self._full.put(key, pages)
        self._stored("full", key, parent, tokens)
        return pages[0]

    def store_tail(
        self, key: BlockHash, n: int, parent: BlockHash | None = None, tokens: Sequence[int] = ()
    ) -> tuple[int, ...] | None:
        """Host SWA pages for a new tail of n pages ending at the page hashed `key`, or None (here
        already / no room). `parent` and `tokens` are those of that last page, for the event."""
        if self._tails.get(key) is not None or n > self.swa_pool.num_pages:
            return None
        pages = self._alloc(self.swa_pool, self._tails, n)
        if pages is None:
            return None
        self._tails.put(key, pages)
        self._stored("swa", key, parent, tokens)
        return pages

    def store_full_at(self, hashes: Sequence[BlockHash], i: int, tokens: Sequence[int]) -> int | None:
        """store_full for page i of a sequence (`hashes`: its pages' hashes, `tokens`: its ids)."""
        p = self.page_size
        return self.store_full(hashes[i], hashes[i - 1] if i else ROOT_HASH, tokens[i * p : (i + 1) * p])

    def store_tail_at(
        self, hashes: Sequence[BlockHash], end: int, tokens: Sequence[int]
    ) -> tuple[int, ...] | None:
        """store_tail for the tail of a sequence's first `end` pages (tail_pages(end) pages)."""
        p = self.page_size
        parent = hashes[end - 2] if end > 1 else ROOT_HASH
        return self.store_tail(hashes[end - 1], self.tail_pages(end), parent, tokens[(end - 1) * p : end * p])

    def install(
        self, hashes: Sequence[BlockHash], start: int, end: int, tokens: Sequence[int]
    ) -> tuple[list[int | None], tuple[int, ...] | None]:
        """Claim host pages for pages [start, end) of a sequence and the tail at `end`, fetched from
        a lower tier (L3). Each page is marked used as it lands, so the install never evicts its own
        earlier pages. Returns each page's new host page (None: here already or no room) and the
        tail's host pages (None: here already or no room); the caller copies the bytes in."""
        full = []
        for i in range(start, end):
            full.append(self.store_full_at(hashes, i, tokens))
            self.protect([hashes[i]])
        return full, self.store_tail_at(hashes, end, tokens)

    def _stored(
        self, kind: Literal["full", "swa"], key: BlockHash, parent: BlockHash | None, tokens: Sequence[int]
    ) -> None:
        if self.event_sink is not None and parent is not None and len(tokens) == self.page_size:
            self.event_sink(
                BlockStored(kind=kind, block_hashes=(key,), parent_hash=parent, token_ids=tuple(tokens),
                            page_size=self.page_size)
            )  # fmt: skip

    def _alloc(self, pool: PagePool, seg: _Segments, n: int) -> tuple[int, ...] | None:
        while pool.num_free < n:
            victim = seg.pop_victim()
            if victim is None:
                return None
            key, pages = victim
            pool.decref(pages)
            if seg is self._full:
                self.evicted_full += 1
            else:
                self.evicted_tails += 1
            if self.event_sink is not None:
                self.event_sink(
                    BlockRemoved(kind="full" if seg is self._full else "swa", block_hashes=(key,))
                )
        return tuple(pool.alloc(n))

    def snapshot(self) -> tuple[list[BlockHash], list[BlockHash]]:
        """(full block hashes, tail end hashes) held now: what a resync publishes."""
        full = list(self._full.probation) + list(self._full.protected)
        tails = list(self._tails.probation) + list(self._tails.protected)
        return full, tails

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def num_full_blocks(self) -> int:
        return len(self._full)

    @property
    def num_tails(self) -> int:
        return len(self._tails)


@dataclass(frozen=True)
class RestoreJob:
    """Copy host pages into a request's fresh device pages before its first forward."""

    full_host: tuple[int, ...]
    full_device: tuple[int, ...]
    swa_host: tuple[int, ...]
    swa_device: tuple[int, ...]


@dataclass(frozen=True)
class SpillJob:
    """Copy device pages of `kind` into host pages just claimed for them (write-through to L2).
    Jobs run in order: a host page claimed twice in one batch holds the last job's data, which is
    what its current key says."""

    kind: str  # "full" | "swa"
    device: tuple[int, ...]
    host: tuple[int, ...]
    keys: tuple[BlockHash, ...] = ()  # full: each page's block hash; swa: the hash the tail ends at
