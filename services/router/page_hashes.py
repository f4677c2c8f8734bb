"""A prompt's page hashes, computed only as far as a lookup reads them.

The prefix index walks a prompt's chained page hashes from the first page and stops at the first
page no worker holds (services/common/prefix_index.py), so routing a prompt that matches k pages
needs k + 1 hashes, not all of them: a new 32k-token conversation behind a 2k-token system prompt
is routed on ~33 hashes instead of 512 (0.04 ms instead of 0.45).

    pages:     [ 0 .. 15 ][ 16 ........ 47 ][ 48 ..................... 111 ] ...
    computed:   1st read    then doubling chunks, each chained on the last hash before it

Chunks double (16, 32, 64, ... pages), so at most about twice what was read is hashed, in a few
hash_blocks calls. The hashes are exactly services.common.block_hash.hash_blocks(ids)[:count];
`packed()` gives them as bytes (16 big-endian each) without making or unmaking ints.

A turn of an agentic session repeats the previous turn's prompt and adds to it (85k tokens, 5,300
pages, of which the last turn hashed all but the new ~100). With a `RecentPrompts` installed
(`use_recent(...)`: the router's app does it while it serves), the first read takes the pages a
recently hashed prompt shares with this one (the same page size, the same ids up to there: the
same hashes) and hashes only the rest.
"""

from __future__ import annotations

import array
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from services.common.block_hash import HASH_BYTES, ROOT_HASH, BlockHash, block_digests, hashes_of

FIRST_CHUNK = 16  # pages hashed by the first read


@dataclass(frozen=True)
class _Hashed:
    ids: np.ndarray  # the prompt's ids (uint32), at least `len(hashes)` pages of them
    page_size: int
    hashes: list[BlockHash]  # its first pages' hashes (never appended to once here)
    digests: bytes  # the same as bytes


class RecentPrompts:
    """The page hashes of the last `size` prompts hashed whole, for the next prompts that start the
    same way. Thread-safe; a prompt's ids are compared in full before any hash is taken from it."""

    def __init__(self, size: int = 32) -> None:
        self._recent: deque[_Hashed] = deque(maxlen=size)
        self._lock = threading.Lock()
        self.reused_pages = 0

    def add(self, ids: np.ndarray, page_size: int, hashes: list[BlockHash], digests: bytes) -> None:
        if hashes:
            with self._lock:
                self._recent.append(_Hashed(ids, page_size, hashes, digests))

    def longest(self, ids: np.ndarray, page_size: int, limit: int) -> tuple[list[BlockHash], bytes]:
        """The hashes (and digests) of the most leading pages, at most `limit`, that a recent prompt
        shares with `ids`; empty if none shares the first page."""
        head = ids[:page_size]
        with self._lock:
            same = [
                h
                for h in self._recent
                if h.page_size == page_size and np.array_equal(h.ids[:page_size], head)
            ]
        best: _Hashed | None = None
        pages = 0
        for h in same:
            n = min(len(h.hashes), limit, len(ids) // page_size) * page_size
            eq = h.ids[:n] == ids[:n]
            k = (n if eq.all() else int(np.argmin(eq))) // page_size
            if k > pages:
                best, pages = h, k
        if best is None:
            return [], b""
        self.reused_pages += pages
        return best.hashes[:pages], best.digests[: pages * HASH_BYTES]


_RECENT: RecentPrompts | None = None


def use_recent(recent: RecentPrompts | None) -> None:
    """Install (or, with None, remove) the process's RecentPrompts: every PageHashes made afterwards
    starts from it."""
    global _RECENT
    _RECENT = recent


class PageHashes(Sequence[BlockHash]):
    """The first `count` page hashes of `ids` (pages of `page_size`), hashed on demand."""

    def __init__(self, ids: Sequence[int], page_size: int, count: int) -> None:
        if not 0 <= count <= len(ids) // page_size:
            raise ValueError(f"{count} pages of {page_size} from {len(ids)} tokens")
        self._ids = ids
        self._page = page_size
        self._count = count
        self._done: list[BlockHash] = []
        self._digests = bytearray()  # the same hashes as bytes (block_hash.block_digests)
        self._recent = (
            _RECENT if isinstance(ids, array.array) and ids.typecode == "I" and ids.itemsize == 4 else None
        )
        self._reused = 0  # pages taken from a recent prompt, not hashed here
        self._fresh = True

    @property
    def computed(self) -> int:
        """Hashes computed so far (not counting those taken from a recent prompt)."""
        return len(self._done) - self._reused

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> BlockHash: ...

    @overload
    def __getitem__(self, i: slice) -> list[BlockHash]: ...

    def __getitem__(self, i: int | slice) -> BlockHash | list[BlockHash]:
        if isinstance(i, slice):
            picked = range(*i.indices(self._count))
            self._extend(max(picked, default=-1) + 1)
            if picked.step > 0:
                return self._done[picked.start : picked.stop : picked.step]
            return [self._done[j] for j in picked]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("page hash index out of range")
        if i >= len(self._done):
            self._extend(i + 1)
        return self._done[i]

    def packed(self, count: int | None = None) -> bytes:
        """The first `count` (default all) hashes as 16 big-endian bytes each, back to back, with no
        int made or unmade (services/common/pending_wire.py's encoding)."""
        n = self._count if count is None else count
        if not 0 <= n <= self._count:
            raise IndexError(f"{n} of {self._count} page hashes")
        self._extend(n)
        return bytes(self._digests[: n * HASH_BYTES])

    def all(self) -> tuple[BlockHash, ...]:
        """Every one of the `count` hashes, in one call (hashing what is left)."""
        self._extend(self._count)
        return tuple(self._done)

    def __iter__(self) -> Iterator[BlockHash]:
        i = 0
        while i < self._count:
            if i == len(self._done):
                self._extend(i + 1)
            chunk = self._done[i:]
            yield from chunk
            i += len(chunk)

    def _extend(self, k: int) -> None:
        """Hash until at least min(k, count) hashes are known."""
        ps, done = self._page, self._done
        if self._fresh and k > 0:  # the first read: first what a recent prompt shares
            self._fresh = False
            if self._recent is not None:
                hashes, digests = self._recent.longest(self._view(), ps, self._count)
                done += hashes
                self._digests += digests
                self._reused = len(hashes)
                if self._reused == self._count:  # all of it known: kept as recent again
                    self._recent.add(self._view(), ps, done, bytes(self._digests))
        while len(done) < min(k, self._count):
            have = len(done)
            end = min(self._count, have + max(FIRST_CHUNK, have))
            parent = done[-1] if done else ROOT_HASH
            digests = block_digests(self._ids[have * ps : end * ps], ps, parent=parent)
            self._digests += digests
            done += hashes_of(digests)
            if len(done) == self._count and self._recent is not None:  # whole: for the next turns
                self._recent.add(self._view(), ps, done, bytes(self._digests))

    def _view(self) -> np.ndarray:
        return np.frombuffer(self._ids, dtype=np.uint32)  # type: ignore[call-overload]
