"""A radix cache over two fresh pools, shared by the radix cache tests."""

from collections.abc import Sequence

from services.common.kv_events import EventBuffer
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import InsertResult, RadixCache


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
