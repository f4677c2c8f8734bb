"""One request's page tables over the two pools: every token in the full pool, a window in the SWA pool.

After a step that leaves KV for [0, e), the SWA pages kept are those covering

    [swa_keep_start(e), e)   with   swa_keep_start(e) = align_down(align_down(e, P) - W, P)

which is enough for the next query (it needs [e - W, e)) and also holds the SWA tail of the
page-aligned prefix L = align_down(e, P), i.e. [L - W, L): what the radix cache stores at a prompt
end or a finish point. With W % P == 0 that is at most W/P + 1 pages, whatever the length.

    positions   ... | p | p | p | p | p | p | p | p | p |e
    full pool   [every page from 0 ...........................]
    SWA pool                [keep_start ............. e)         <- pages before are released

A step computes positions [s, e). Attention reads SWA KV for [s - W, s) (already in the pool) and
writes SWA KV only for [max(s, keep_start(e)), e): tokens that fall out of the window inside the
step never touch the pool. Pages dropping out of the window that this request owns alone are
re-used for the new positions (the model reads a layer's old KV before it writes that layer's new
KV), the rest are released after the forward, never before: another request of the same batch must
not get them while this forward still reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.engine.kv.page_pool import OutOfPages, PagePool


def align_down(x: int, page_size: int) -> int:
    return x - x % page_size


def swa_keep_start(seq_len: int, page_size: int, window: int) -> int:
    """First position whose SWA KV is kept once KV exists for [0, seq_len)."""
    return align_down(max(0, align_down(seq_len, page_size) - window), page_size)


@dataclass(frozen=True)
class StepSlots:
    """Flat slot indices (page * page_size + offset) for one request's step over [start, end)."""

    start: int
    end: int
    full_read: list[int]  # positions [0, start)
    full_write: list[int]  # positions [start, end)
    swa_read_start: int  # = max(0, start - window)
    swa_read: list[int]  # positions [swa_read_start, start)
    swa_write_start: int  # = max(start, swa_keep_start(end))
    swa_write: list[int]  # positions [swa_write_start, end)


class ReqPages:
    def __init__(self, full_pool: PagePool, swa_pool: PagePool, window: int) -> None:
        if full_pool.page_size != swa_pool.page_size:
            raise ValueError("full and SWA pools must share a page size")
        self.full_pool = full_pool
        self.swa_pool = swa_pool
        self.page_size = full_pool.page_size
        self.window = window
        self.full: list[int] = []  # page of logical page i
        self.swa: dict[int, int] = {}  # logical page index -> page, only inside the kept window
        self.kv_len = 0  # positions [0, kv_len) have KV
        self._release_after_step: list[int] = []

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def swa_pages_in_use(self) -> int:
        return len(self.swa) + len(self._release_after_step)

    def new_pages_needed(self, end: int) -> tuple[int, int]:
        """Worst-case (full, swa) pages a step to `end` allocates (ignores SWA page re-use)."""
        p = self.page_size
        full = max(0, (end - 1) // p + 1 - len(self.full))
        keep = range(swa_keep_start(end, p, self.window) // p, (end - 1) // p + 1)
        swa = sum(1 for i in keep if i not in self.swa)
        return full, swa

    # -- prefix from the radix cache -----------------------------------------------------------
    def adopt_prefix(self, length: int, full_pages: list[int], swa_pages: list[int | None]) -> None:
        """Take references on a cached prefix [0, length) (page-aligned): the start of this request."""
        p = self.page_size
        if self.kv_len or self.full:
            raise RuntimeError("adopt_prefix on a table that already holds pages")
        if length % p or len(full_pages) != length // p or len(swa_pages) != length // p:
            raise ValueError("cached prefix must be page-aligned with one page per page")
        first = swa_keep_start(length, p, self.window) // p
        window_pages = {i: swa_pages[i] for i in range(first, length // p)}
        missing = [i for i, pg in window_pages.items() if pg is None]
        if missing:
            raise ValueError(f"cached prefix of {length} tokens lacks SWA pages {missing}: not window-safe")
        self.full_pool.incref(full_pages)
        self.full = list(full_pages)
        self.swa = {i: pg for i, pg in window_pages.items() if pg is not None}
        self.swa_pool.incref(list(self.swa.values()))
        self.kv_len = length

    def restore_prefix(self, l1_len: int, l1_full: list[int], end: int) -> tuple[list[int], list[int]]:
        """Start with the cached L1 prefix [0, l1_len) (full pages only: its window is not needed)
        and fresh pages for [l1_len, end) restored from a lower tier: full pages for those
        positions and SWA pages for the window before `end`. Returns (new full pages, new SWA pages
        for logical pages swa_keep_start(end)/P ..). Raises OutOfPages having changed nothing."""
        p = self.page_size
        if self.kv_len or self.full:
            raise RuntimeError("restore_prefix on a table that already holds pages")
        if l1_len % p or end % p or not l1_len < end or len(l1_full) != l1_len // p:
            raise ValueError("restored prefix must be page-aligned and extend the L1 prefix")
        first = swa_keep_start(end, p, self.window) // p
        new_full = self.full_pool.alloc(end // p - l1_len // p)
        try:
            new_swa = self.swa_pool.alloc(end // p - first)
        except OutOfPages:
            self.full_pool.decref(new_full)
            raise
        self.full_pool.incref(l1_full)
        self.full = list(l1_full) + new_full
        self.swa = dict(zip(range(first, end // p), new_swa, strict=True))
        self.kv_len = end
        return new_full, new_swa

    # -- KV that arrives from elsewhere (a prefill worker) -----------------------------------------
    def install(self, length: int) -> tuple[list[int], list[int]]:
        """Allocate for KV of [0, length) computed elsewhere; returns (full slots for [0, length),
        SWA slots for [max(0, length - window), length)). Raises OutOfPages having changed nothing."""
        p, w = self.page_size, self.window
        if self.kv_len or self.full:
            raise RuntimeError("install on a table that already holds pages")
        if length < 1:
            raise ValueError("install needs at least one token")
        n_full = (length - 1) // p + 1
        swa_idx = list(range(swa_keep_start(length, p, w) // p, (length - 1) // p + 1))
        full = self.full_pool.alloc(n_full)
        try:
            swa = self.swa_pool.alloc(len(swa_idx))
        except OutOfPages:
            self.full_pool.decref(full)
            raise
        self.full, self.swa, self.kv_len = full, dict(zip(swa_idx, swa, strict=True)), length
        return self._full_slots(0, length), [self._swa_slot(q) for q in range(max(0, length - w), length)]

    def read_slots(self) -> tuple[list[int], list[int]]:
        """(full slots for [0, kv_len), SWA slots for [max(0, kv_len - window), kv_len)): what leaves."""
        n, w = self.kv_len, self.window
        return self._full_slots(0, n), [self._swa_slot(q) for q in range(max(0, n - w), n)]

    # -- one step ------------------------------------------------------------------------------
    def plan_step(self, end: int) -> StepSlots:
        """Allocate for computing [kv_len, end). Raises OutOfPages having changed nothing."""
        p, w, start = self.page_size, self.window, self.kv_len
        if end <= start:
            raise ValueError(f"step must advance: kv_len={start}, end={end}")
        keep_first = swa_keep_start(end, p, w) // p
        last = (end - 1) // p
        write_start = max(start, swa_keep_start(end, p, w))
        needed = [i for i in range(write_start // p, last + 1) if i not in self.swa]
        dropped = [i for i in self.swa if i < keep_first]
        # a one-token step (decode) never re-uses a page it still reads, so its backend may write the
        # new token before gathering its context; a chunk's backend reads every layer before writing
        still_read = max(0, start - w) // p if end - start == 1 else 0
        reusable = [
            i
            for i in dropped
            if self.swa_pool.refcount(self.swa[i]) == 1 and (end - start > 1 or i < still_read)
        ][: len(needed)]
        n_full = max(0, last + 1 - len(self.full))
        n_swa = len(needed) - len(reusable)
        new_full = self.full_pool.alloc(n_full)
        try:
            new_swa = self.swa_pool.alloc(n_swa)
        except OutOfPages:
            self.full_pool.decref(new_full)
            raise
        # slots to read are taken from the old mapping, before any page changes hands
        read_start = max(0, start - w)
        swa_read = [self._swa_slot(q) for q in range(read_start, start)]
        full_read = self._full_slots(0, start)
        self.full.extend(new_full)
        fresh = [self.swa.pop(i) for i in reusable] + new_swa
        for i in [i for i in dropped if i not in reusable]:
            self._release_after_step.append(self.swa.pop(i))
        for i, page in zip(needed, fresh, strict=True):
            self.swa[i] = page
        return StepSlots(
            start=start,
            end=end,
            full_read=full_read,
            full_write=self._full_slots(start, end),
            swa_read_start=read_start,
            swa_read=swa_read,
            swa_write_start=write_start,
            swa_write=[self._swa_slot(q) for q in range(write_start, end)],
        )

    def commit_step(self, end: int) -> None:
        """The forward wrote KV up to `end`: release the pages that left the window."""
        self.kv_len = end
        self.swa_pool.decref(self._release_after_step)
        self._release_after_step = []

    def release_all(self) -> None:
        self.full_pool.decref(self.full)
        self.swa_pool.decref(list(self.swa.values()) + self._release_after_step)
        self.full, self.swa, self._release_after_step = [], {}, []
        self.kv_len = 0

    # -- for the radix cache -------------------------------------------------------------------
    def prefix_pages(self, length: int) -> tuple[list[int], list[int | None]]:
        """(full, swa) pages of the page-aligned prefix [0, length); None where SWA KV was dropped."""
        n = length // self.page_size
        if length % self.page_size or length > self.kv_len:
            raise ValueError(f"prefix {length} must be page-aligned and <= kv_len {self.kv_len}")
        return self.full[:n], [self.swa.get(i) for i in range(n)]

    # -- helpers -------------------------------------------------------------------------------
    def _full_slots(self, lo: int, hi: int) -> list[int]:
        p, full = self.page_size, self.full
        return [full[q // p] * p + q % p for q in range(lo, hi)]

    def _swa_slot(self, pos: int) -> int:
        return self.swa[pos // self.page_size] * self.page_size + pos % self.page_size
