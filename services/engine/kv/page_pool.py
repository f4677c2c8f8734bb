"""One paged KV pool's bookkeeping: page ids, reference counts and an O(1) free list.

The pool owns no tensors: a page id indexes rows of the KV buffers the model runner holds.
A hybrid model composes two of these (full-attention pages and SWA pages), never one pool
full of `if swa:`. Every holder of a page (a running request, the radix cache) owns exactly the
references it took; a page returns to the free list when its last reference is dropped.
"""

from __future__ import annotations

from collections.abc import Iterable


class OutOfPages(Exception):
    """Fewer free pages than asked for; nothing was allocated."""


class PagePool:
    """Pages [0, num_pages) of `page_size` tokens each, reference counted."""

    def __init__(self, num_pages: int, page_size: int, name: str) -> None:
        if num_pages < 0 or page_size <= 0:
            raise ValueError(f"bad pool shape: {num_pages} pages of {page_size} tokens")
        self.num_pages = num_pages
        self.page_size = page_size
        self.name = name
        self._refs = [0] * num_pages
        # a stack: pages freed last are handed out first (their KV rows are warm in cache)
        self._free = list(range(num_pages - 1, -1, -1))

    def __repr__(self) -> str:
        return f"PagePool({self.name!r}, used={self.num_used}/{self.num_pages}, page_size={self.page_size})"

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self._free)

    def alloc(self, n: int) -> list[int]:
        """n free pages with one reference each; raises OutOfPages (allocating nothing) if short."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"pool {self.name!r}: asked for {n} pages, {len(self._free)} free")
        pages = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        pages.reverse()
        for p in pages:
            self._refs[p] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        """One more reference on each page (a page listed twice gets two); pages must be in use."""
        pages = list(pages)
        for p in pages:
            self._check_used(p)
        for p in pages:
            self._refs[p] += 1

    def decref(self, pages: Iterable[int]) -> int:
        """Drop one reference per listed page; returns how many pages became free.

        Dropping more references than a page holds raises ValueError and changes nothing.
        """
        pages = list(pages)
        drops: dict[int, int] = {}
        for p in pages:
            self._check_used(p)
            drops[p] = drops.get(p, 0) + 1
        for p, k in drops.items():
            if k > self._refs[p]:
                raise ValueError(f"pool {self.name!r}: page {p} has {self._refs[p]} refs, dropping {k}")
        freed = 0
        for p, k in drops.items():
            self._refs[p] -= k
            if self._refs[p] == 0:
                self._free.append(p)
                freed += 1
        return freed

    def refcount(self, page: int) -> int:
        """References held on `page` (0 = free)."""
        self._check_id(page)
        return self._refs[page]

    def _check_id(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise ValueError(f"pool {self.name!r}: page {page} outside [0, {self.num_pages})")

    def _check_used(self, page: int) -> None:
        self._check_id(page)
        if self._refs[page] == 0:
            raise ValueError(f"pool {self.name!r}: page {page} is free")
