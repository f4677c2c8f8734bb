"""Routing-time residency: the prefix a prefill worker is about to hold, before its KV events say so.

When a router sends a prompt to a prefill worker, the worker will cache the prompt's page-aligned
prefix with its SWA tail (the engine inserts it when the prefill finishes: docs/engine.md). Until
its KV events arrive, every router would route the prompt's siblings and its next turn as if the
worker held nothing. A *pending entry* says what the worker will hold:

    pages      0    1    2  ...  E-2  E-1      E = the prompt's full pages (n // page_size)
    full       P    P    P  ...   P    P       pending full KV for every page
    swa                           P    P       pending SWA KV for the `need` pages before E
                                               (+ before a branch point the worker will checkpoint)

It counts in the prefix index like a real block of that worker (window-safe at the prompt's own
end, nowhere else), and leaves the index when

- the worker's own events make it true (`satisfied`: the real sets hold its end page and its SWA
  pages): it has been *replaced*;
- its deadline passes (a TTL tied to the prefill's expected duration: the worker may have evicted
  or never cached it);
- the request failed or was aborted (an `unpend` entry), the worker cleared its cache, left the
  registry, or restarted (another incarnation: services/common/kv_index_follower.py fences it).

`PendingLayer` is the reference-counted mask layer that PrefixIndex ORs into its own masks while it
matches; it takes worker bits, not names, and its owner holds the lock. No Redis, no torch here:
the wire is in `pending_wire.py`.
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter, deque
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from typing import Literal

from services.common.block_hash import BlockHash

Kind = Literal["full", "swa"]


@dataclass(frozen=True, slots=True)
class PendingEntry:
    pid: str  # the routing decision's id (the request id): what `unpend` names
    worker: str  # the prefill worker's worker_id
    full: tuple[BlockHash, ...]  # the prompt's page hashes [0, E), E >= 1
    swa: tuple[BlockHash, ...]  # page hashes whose SWA KV the worker will keep (a subset of full)
    deadline: float  # wall clock (time.time()) after which the entry is dropped
    incarnation: str = ""  # the worker's start id as the router knew it ("" = unknown)
    tokens: int = 0  # prompt tokens the worker is expected to compute for it (its load until it reports)
    at: float = 0.0  # wall clock of the decision

    def __post_init__(self) -> None:
        if not self.full:
            raise ValueError("a pending entry needs at least one full page")
        if not self.pid or not self.worker:
            raise ValueError("a pending entry needs a pid and a worker")

    def hashes(self, kind: Kind) -> tuple[BlockHash, ...]:
        return self.full if kind == "full" else self.swa


def swa_pages(full: tuple[BlockHash, ...], need: int, branch_at: int = 0) -> tuple[BlockHash, ...]:
    """The pages whose SWA KV a worker keeps after prefilling `full` (E = len(full) pages): the
    `need` pages before E (the prompt end's tail), and the `need` pages before `branch_at` when the
    worker's cache ends its window-safe match before that page (the scheduler's branch checkpoint)."""
    e = len(full)
    picked = set(range(max(0, e - need), e))
    if 0 < branch_at < e:
        picked |= set(range(max(0, branch_at - need), branch_at))
    return tuple(full[i] for i in sorted(picked))


class PendingLayer:
    """Pending entries as per-kind bitmasks over the owner's worker bits, reference-counted per
    (worker, kind, hash) so that overlapping entries (siblings sharing a prefix) drop one by one.

    A worker with one entry needs no counts (its flag is set exactly on that entry's hashes), and
    that is the common case (an 85k-token prompt is 5,300 pages: counting is a third of adding
    and half of dropping). So counts exist only for workers with two entries or more: made when
    the second arrives (the first one's hashes counted then), let go when one is left.

    Not thread-safe: PrefixIndex calls it with its lock held."""

    def __init__(self) -> None:
        self.masks: dict[Kind, dict[BlockHash, int]] = {"full": {}, "swa": {}}
        # bit -> kind -> hash -> refs, for the bits with >= 2 entries only
        self._counts: dict[int, dict[Kind, dict[BlockHash, int]]] = {}
        self._entries: dict[str, tuple[PendingEntry, int]] = {}  # pid -> (entry, bit)
        self._by_bit: dict[int, set[str]] = {}
        self._deadlines: list[tuple[float, str]] = []  # min-heap; stale items skipped
        self.added = 0
        self.replaced = 0
        self.expired = 0
        self.dropped = 0  # unpend, clear, leave, fence

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, pid: str) -> bool:
        return pid in self._entries

    def entries(self) -> list[PendingEntry]:
        return [e for e, _ in self._entries.values()]

    def of_bit(self, bit: int) -> list[PendingEntry]:
        return [self._entries[p][0] for p in self._by_bit.get(bit, ())]

    def tokens_since(self, bit: int, since: float) -> int:
        """Tokens of the worker's entries decided after `since` (its last load report): work routed
        to it that its published load cannot show yet."""
        entries = self._entries
        return sum(e.tokens for e in (entries[p][0] for p in self._by_bit.get(bit, ())) if e.at >= since)

    def add(self, entry: PendingEntry, bit: int) -> bool:
        """Add the entry for the worker with bit `bit`; False if its pid is already here."""
        if entry.pid in self._entries:
            return False
        pids = self._by_bit.setdefault(bit, set())
        if len(pids) == 1:  # the worker's second entry: count the first one's hashes now
            first = self._entries[next(iter(pids))][0]
            self._counts[bit] = {kind: _tally(first.hashes(kind)) for kind in ("full", "swa")}
        self._entries[entry.pid] = (entry, bit)
        pids.add(entry.pid)
        counts = self._counts.get(bit)
        flag = 1 << bit
        for kind in ("full", "swa"):
            masks = self.masks[kind]
            if counts is None:  # the flag OR-ed into each hash's mask, at C speed
                hs = entry.hashes(kind)
                masks.update(
                    zip(hs, map(operator.or_, map(masks.get, hs, repeat(0)), repeat(flag)), strict=True)
                )
                continue
            own = counts[kind]  # the entry's hashes counted in; the flag set where none was
            tally = Counter(entry.hashes(kind))
            new = list(compress(tally, map(operator.not_, map(own.__contains__, tally))))
            own.update(
                zip(tally, map(operator.add, map(own.get, tally, repeat(0)), tally.values()), strict=True)
            )
            masks.update(
                zip(new, map(operator.or_, map(masks.get, new, repeat(0)), repeat(flag)), strict=True)
            )
        heapq.heappush(self._deadlines, (entry.deadline, entry.pid))
        self.added += 1
        return True

    def drop(self, pid: str) -> PendingEntry | None:
        got = self._entries.pop(pid, None)
        if got is None:
            return None
        entry, bit = got
        pids = self._by_bit[bit]
        pids.discard(pid)
        if not pids:
            del self._by_bit[bit]
        counts = self._counts.get(bit)
        keep = ~(1 << bit)
        for kind in ("full", "swa"):
            masks = self.masks[kind]
            if counts is None:  # the worker's only entry: its flag goes wherever the entry has it
                clear_flag(masks, entry.hashes(kind), keep)
                continue
            own = counts[kind]  # the entry's hashes counted out; the flag cleared where none is left
            tally = Counter(entry.hashes(kind))
            left = list(map(operator.sub, map(own.__getitem__, tally), tally.values()))
            own.update(compress(zip(tally, left, strict=True), left))
            gone = list(compress(tally, map(operator.not_, left)))
            deque(map(own.__delitem__, gone), maxlen=0)
            clear_flag(masks, gone, keep)
        if counts is not None and len(pids) < 2:  # one entry left (or none): no counts needed
            del self._counts[bit]
        return entry

    def drop_bit(self, bit: int) -> int:
        """Drop every entry of one worker (it cleared its cache, left, or restarted)."""
        pids = list(self._by_bit.get(bit, ()))
        for pid in pids:
            self.drop(pid)
        self.dropped += len(pids)
        return len(pids)

    def expire(self, now: float) -> int:
        """Drop the entries whose deadline is at or before `now`."""
        n = 0
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            deadline, pid = heapq.heappop(heap)
            got = self._entries.get(pid)
            if got is not None and got[0].deadline == deadline:
                self.drop(pid)
                n += 1
        self.expired += n
        if not self._entries:
            self._deadlines.clear()
        return n

    def replace_satisfied(self, bit: int, full: Container[BlockHash], swa: Container[BlockHash]) -> int:
        """Drop the worker's entries that its real state (`full`, `swa`: sets, or dicts keyed by
        hash) now makes true."""
        done = [e.pid for e in self.of_bit(bit) if satisfied(e, full, swa)]
        for pid in done:
            self.drop(pid)
        self.replaced += len(done)
        return len(done)


def clear_flag(masks: dict[BlockHash, int], hashes: Sequence[BlockHash], keep: int) -> None:
    """masks[h] &= keep for each hash, a mask that becomes 0 removed (one listed twice: once), at C
    speed: the new masks computed first, then set where nonzero and popped where zero."""
    new = list(map(operator.and_, map(masks.get, hashes, repeat(0)), repeat(keep)))
    masks.update(compress(zip(hashes, new, strict=True), new))
    deque(map(masks.pop, compress(hashes, map(operator.not_, new)), repeat(None)), maxlen=0)


def _tally(hashes: tuple[BlockHash, ...]) -> dict[BlockHash, int]:
    """How many times each hash is listed."""
    return dict(Counter(hashes))


def satisfied(
    entry: PendingEntry, full: Container[BlockHash], swa: Iterable[BlockHash] | Container[BlockHash]
) -> bool:
    """Whether a worker's real (full, swa) hashes already hold what the entry announces at its end
    (`swa`: a set or a dict keyed by hash, else any iterable of hashes)."""
    swa_in = swa if isinstance(swa, (set, frozenset, dict)) else set(swa)  # type: ignore[arg-type]
    return entry.full[-1] in full and all(h in swa_in for h in entry.swa)


__all__ = ["PendingEntry", "PendingLayer", "clear_flag", "satisfied", "swa_pages"]
