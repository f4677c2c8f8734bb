"""Which worker holds which KV blocks, and the longest window-safe prefix of a prompt on each.

Pure bookkeeping (no torch, no Redis): the router's KV-event follower feeds it, bench/ can feed it
from simulated workers. A worker's state is two sets of block hashes (services/common/block_hash):
pages with full-attention KV, and pages with SWA KV. A prefix of L pages is window-safe on a worker
when it holds full KV for pages [0, L) and SWA KV for the pages overlapping the last `window`
tokens, i.e. pages [L - need, L) with need = ceil(window / page_size) (clamped at 0):

    pages      0    1    2    3    4    5    6        window = 2 pages
    full       #    #    #    #    #    #    .        raw  = 6
    swa        .    #    .    .    #    #    #        safe = 6: pages 4, 5 have SWA
    swa'       #    #    .    .    #    .    #        safe = 2: the hole at 5 rules out 6; 5 needs 4, 3
                                                     (hole at 3); 3 needs 2 (hole); 2 needs 1, 0: safe

Routing-time residency (services/common/pending_residency.py): pending entries, what a worker is
about to hold, sit in a second, reference-counted mask layer that `match` ORs into the real one;
a worker's own events replace them, their deadline expires them, and `clear` / `remove_worker`
drop them with the worker's blocks.

Layout for speed: every worker gets a bit; each block hash maps to an int bitmask of the workers
holding it (one dict per KV kind). A worker's own hashes are dict keys too, not a set: a dict of
ints is never tracked by the garbage collector, a set is, and walking a few hundred thousand
hashes made each full collection of the router tens of milliseconds longer. `match` walks the query's blocks once, AND-ing a mask of the
workers still matching (dropping out records a worker's raw end), then backs off groups of workers
that share an end together, bit-parallel, from the raw end downwards.
"""

from __future__ import annotations

import bisect
import heapq
import operator
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from typing import TYPE_CHECKING, cast

from services.common.block_hash import BlockHash
from services.common.kv_spec import KVKind
from services.common.pending_residency import PendingEntry, PendingLayer, clear_flag

if TYPE_CHECKING:  # the event types live with the engine's cache; no runtime import (router side)
    from services.common.kv_events import BlockRemoved, BlockStored, KVEvent


@dataclass(frozen=True, slots=True)
class WorkerMatch:
    raw_blocks: int  # longest prefix of the query's blocks with full KV on the worker
    safe_blocks: int  # longest window-safe prefix (<= raw_blocks)


NO_MATCH = WorkerMatch(0, 0)


class PrefixIndex:
    """Thread-safe: `apply` and friends (the follower thread) and `match` (request threads) lock."""

    def __init__(self, page_size: int, window: int) -> None:
        if page_size <= 0 or window < 0:
            raise ValueError(f"bad index shape: page_size={page_size}, window={window}")
        self.page_size = page_size
        self.window = window
        self.need_pages = -(-window // page_size)  # pages overlapping the window before a page-aligned L
        self._lock = threading.Lock()
        self._masks: dict[KVKind, dict[BlockHash, int]] = {"full": {}, "swa": {}}
        self._blocks: dict[str, dict[KVKind, dict[BlockHash, bool]]] = {}  # worker -> kind -> hashes (keys)
        self._bit: dict[str, int] = {}  # worker -> its bit
        self._ids: dict[int, str] = {}  # bit -> worker
        self._free_bits: list[int] = []
        self._all = 0  # mask of every known worker
        self.pending = PendingLayer()  # routing-time residency (read under the lock)
        self.clock = time.time  # the pending deadlines' clock (tests may set another)

    # ---- updates -------------------------------------------------------------------------------

    def apply(self, worker_id: str, event: KVEvent) -> None:
        """Apply one KV event: BlockStored / BlockRemoved (kind "full" | "swa") / AllCleared."""
        t = event.type_name
        if t == "stored" or t == "removed":
            ev = cast("BlockStored | BlockRemoved", event)
            (self.store if t == "stored" else self.remove)(worker_id, ev.kind, ev.block_hashes)
        elif t == "cleared":
            self.clear(worker_id)
        else:
            raise ValueError(f"not a KV event: {event!r}")

    def store(self, worker_id: str, kind: KVKind, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            self._store(worker_id, kind, hashes)
            self._replace_pending(worker_id)

    def remove(self, worker_id: str, kind: KVKind, hashes: Iterable[BlockHash]) -> None:
        with self._lock:
            self._remove(worker_id, kind, hashes)

    def clear(self, worker_id: str) -> None:
        """Drop every block of the worker; it stays known (with nothing cached)."""
        with self._lock:
            self._clear(worker_id)
            self._bit_of(worker_id)

    def load_worker(self, worker_id: str, full: Iterable[BlockHash], swa: Iterable[BlockHash]) -> None:
        """Replace the worker's whole state (a snapshot), atomically for readers."""
        with self._lock:
            self._clear(worker_id, keep_pending=True)
            self._store(worker_id, "full", full)
            self._store(worker_id, "swa", swa)
            self._replace_pending(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        with self._lock:
            self._clear(worker_id)
            bit = self._bit.pop(worker_id, None)
            if bit is not None:
                del self._ids[bit]
                self._blocks.pop(worker_id, None)
                self._all &= ~(1 << bit)
                heapq.heappush(self._free_bits, bit)

    # ---- routing-time residency (pending_residency.py) ------------------------------------------

    def add_pending(self, entry: PendingEntry) -> bool:
        """Count `entry` as the worker's until replaced, expired or dropped. False if it is here
        already (by pid), past its deadline, or already true of the worker's real state."""
        with self._lock:
            if entry.pid in self.pending or entry.deadline <= self.clock():
                return False
            bit = self._bit_of(entry.worker)
            own = self._blocks[entry.worker]
            if entry.full[-1] in own["full"] and all(h in own["swa"] for h in entry.swa):
                return False  # the events came first: nothing to announce
            return self.pending.add(entry, bit)

    def drop_pending(self, pid: str) -> bool:
        """The routed request failed or was aborted: its worker will not cache the prompt."""
        with self._lock:
            gone = self.pending.drop(pid) is not None
            self.pending.dropped += gone
            return gone

    def pending_tokens(self, worker_id: str, since: float) -> int:
        """Tokens routed to the worker after `since` (its last load report) by pending entries."""
        with self._lock:
            bit = self._bit.get(worker_id)
            return 0 if bit is None or not len(self.pending) else self.pending.tokens_since(bit, since)

    def pending_of(self, worker_id: str) -> list[PendingEntry]:
        with self._lock:
            bit = self._bit.get(worker_id)
            return [] if bit is None else self.pending.of_bit(bit)

    def clear_pending(self) -> None:
        """Forget every pending entry (a follower rebuilding them from the stream)."""
        with self._lock:
            self.pending = PendingLayer()

    # ---- queries -------------------------------------------------------------------------------

    def workers(self) -> set[str]:
        with self._lock:
            return set(self._bit)

    def blocks(self, worker_id: str) -> tuple[frozenset[BlockHash], frozenset[BlockHash]]:
        """The worker's (full, swa) block hashes."""
        with self._lock:
            b = self._blocks.get(worker_id)
            if b is None:
                return frozenset(), frozenset()
            return frozenset(b["full"]), frozenset(b["swa"])

    def state(self) -> dict[str, tuple[frozenset[BlockHash], frozenset[BlockHash]]]:
        """Every worker's (full, swa) block hashes: two indexes are equal iff their states are."""
        return {w: self.blocks(w) for w in sorted(self.workers())}

    def cached_pages(self) -> dict[str, int]:
        """Full-KV pages each worker holds (its cache's footprint, as its events say)."""
        with self._lock:
            return {w: len(b["full"]) for w, b in self._blocks.items()}

    def num_blocks(self) -> tuple[int, int]:
        """Distinct (full, swa) block hashes over all workers."""
        with self._lock:
            return len(self._masks["full"]), len(self._masks["swa"])

    def match(
        self, block_hashes: Sequence[BlockHash], workers: Iterable[str] | None = None
    ) -> dict[str, WorkerMatch]:
        """raw and window-safe matched blocks of `block_hashes` (a prompt's chained hashes) per worker.

        Answers for every worker in `workers` (unknown ones: no match), or every known worker."""
        with self._lock:
            if len(self.pending):
                self.pending.expire(self.clock())
            if workers is None:
                wanted = list(self._bit)
                cand = self._all
            else:
                wanted = list(dict.fromkeys(workers))
                cand = 0
                for w in wanted:
                    bit = self._bit.get(w)
                    if bit is not None:
                        cand |= 1 << bit
            raw_groups = self._raw_groups(block_hashes, cand)
            safe_groups = self._safe_groups(block_hashes, raw_groups) if self.need_pages else raw_groups
            raw = self._per_worker(raw_groups)
            safe = self._per_worker(safe_groups)
        return {w: WorkerMatch(raw[w], safe[w]) if w in raw else NO_MATCH for w in wanted}

    # ---- internals (lock held) -----------------------------------------------------------------

    def _bit_of(self, worker_id: str) -> int:
        bit = self._bit.get(worker_id)
        if bit is None:
            bit = heapq.heappop(self._free_bits) if self._free_bits else len(self._bit)
            self._bit[worker_id] = bit
            self._ids[bit] = worker_id
            self._blocks[worker_id] = {"full": {}, "swa": {}}
            self._all |= 1 << bit
        return bit

    def _store(self, worker_id: str, kind: KVKind, hashes: Iterable[BlockHash]) -> None:
        """The worker's flag OR-ed into the mask of each hash it did not hold, at C speed (events
        often list pages the worker holds already: those are only looked up)."""
        flag = 1 << self._bit_of(worker_id)
        masks = self._masks[kind]
        own = self._blocks[worker_id][kind]
        hs = hashes if isinstance(hashes, (list, tuple)) else list(hashes)
        new = list(compress(hs, map(operator.not_, map(own.__contains__, hs))))  # (one listed twice: twice)
        own.update(zip(new, repeat(True)))
        masks.update(zip(new, map(operator.or_, map(masks.get, new, repeat(0)), repeat(flag)), strict=True))

    def _replace_pending(self, worker_id: str) -> None:
        bit = self._bit.get(worker_id)
        if bit is not None and len(self.pending):
            own = self._blocks[worker_id]
            self.pending.replace_satisfied(bit, own["full"], own["swa"])

    def _remove(self, worker_id: str, kind: KVKind, hashes: Iterable[BlockHash]) -> None:
        bit = self._bit.get(worker_id)
        if bit is None:
            return
        self._drop(bit, self._blocks[worker_id][kind], self._masks[kind], hashes)

    def _clear(self, worker_id: str, keep_pending: bool = False) -> None:
        bit = self._bit.get(worker_id)
        if bit is None:
            return
        if not keep_pending:
            self.pending.drop_bit(bit)
        for kind, own in self._blocks[worker_id].items():
            self._drop(bit, own, self._masks[kind], list(own))

    @staticmethod
    def _drop(
        bit: int, own: dict[BlockHash, bool], masks: dict[BlockHash, int], hashes: Iterable[BlockHash]
    ) -> None:
        hs = hashes if isinstance(hashes, (list, tuple)) else list(hashes)
        held = list(compress(hs, map(own.__contains__, hs)))  # (a hash listed twice is there twice)
        deque(map(own.pop, held, repeat(None)), maxlen=0)
        clear_flag(masks, held, ~(1 << bit))

    def _raw_groups(self, hashes: Sequence[BlockHash], cand: int) -> list[tuple[int, int]]:
        """(raw end, mask of the workers whose full-KV match ends there), ascending ends.

        Page by page, `alive` (the workers matching so far) is AND-ed with the page's mask; a worker
        dropping out at page i ends at i. Done by chunks of pages at C speed: the masks looked up
        with `map`, the running AND with `accumulate`. The running AND only loses bits, so it never
        grows as a number either: each drop is found by bisection (at most one per worker)."""
        groups: list[tuple[int, int]] = []
        full = self._masks["full"]
        pend = self.pending.masks["full"]
        alive = cand
        i = 0
        for start, stop in _chunks(len(hashes)):
            if not alive:
                break
            chunk = hashes[start:stop]
            masks = map(full.get, chunk, repeat(0))
            if pend:
                masks = map(operator.or_, masks, map(pend.get, chunk, repeat(0)))
            acc = list(accumulate(masks, operator.and_, initial=alive))  # acc[k]: after k pages
            last, k = acc[-1], 0
            while alive != last:
                k = bisect.bisect_right(acc, -alive, lo=k, key=operator.neg)  # first acc[k] < alive
                groups.append((i + k - 1, alive & ~acc[k]))
                alive = acc[k]
            i += len(chunk)
        if alive:
            groups.append((i, alive))
        return groups

    def _safe_groups(
        self, hashes: Sequence[BlockHash], raw_groups: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Back each group off to its window-safe end (see module doc), deepest ends first.

        A worker missing SWA at page j cannot end anywhere in (j, j + need]; its next candidate end
        is j. Ends only decrease, so a max-heap of pending ends visits each end once."""
        swa = self._masks["swa"]
        pend = self.pending.masks["swa"]
        need = self.need_pages
        pending: dict[int, int] = {}
        for end, mask in raw_groups:
            pending[end] = pending.get(end, 0) | mask
        heap = [-e for e in pending]
        heapq.heapify(heap)
        out: list[tuple[int, int]] = []
        while heap:
            end = -heapq.heappop(heap)
            group = pending.pop(end)
            j = end - 1
            lo = max(0, end - need)
            while j >= lo and group:
                h = hashes[j]
                missing = group & ~(swa.get(h, 0) | pend.get(h, 0) if pend else swa.get(h, 0))
                if missing:
                    group &= ~missing
                    if j in pending:
                        pending[j] |= missing
                    else:
                        pending[j] = missing
                        heapq.heappush(heap, -j)
                j -= 1
            if group:
                out.append((end, group))
        return out

    def _per_worker(self, groups: list[tuple[int, int]]) -> dict[str, int]:
        ids = self._ids
        out: dict[str, int] = {}
        for end, mask in groups:
            while mask:
                low = mask & -mask
                out[ids[low.bit_length() - 1]] = end
                mask ^= low
        return out


FIRST_CHUNK = 16  # pages `match` reads first; then up to twice as far each time


def _chunks(n: int) -> Iterator[tuple[int, int]]:
    """[start, stop) of consecutive slices of n pages ending at 16, 32, 64, ...: a match that ends
    early reads less than twice what it needs, and a router's PageHashes, which hashes up to the
    same ends, hashes no more than that."""
    start, stop = 0, FIRST_CHUNK
    while start < n:
        yield start, min(n, stop)
        start, stop = stop, 2 * stop


__all__ = ["NO_MATCH", "KVKind", "PrefixIndex", "WorkerMatch"]
