"""A PrefixIndex-shaped TEST DOUBLE, filled by hand, and an index source around it.

Same contract as services/common/prefix_index.PrefixIndex.match, computed the obvious way (sets per
worker, a back-off loop): a prefix of L pages is window-safe when the worker has full KV for pages
[0, L) and SWA KV for pages [L - ceil(window / page_size), L) (clamped at 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.common.block_hash import BlockHash


@dataclass(frozen=True)
class FakeMatch:
    raw_blocks: int
    safe_blocks: int


class FakePrefixIndex:
    def __init__(self, page_size: int, window: int) -> None:
        self.page_size = page_size
        self.window = window
        self.need = -(-window // page_size)
        self.full: dict[str, set[BlockHash]] = {}
        self.swa: dict[str, set[BlockHash]] = {}
        self.calls = 0

    def store(self, worker: str, hashes: Iterable[BlockHash], swa: bool = True) -> None:
        """Full KV for `hashes` (and SWA KV too unless swa=False)."""
        hashes = list(hashes)
        self.full.setdefault(worker, set()).update(hashes)
        if swa:
            self.swa.setdefault(worker, set()).update(hashes)
        else:
            self.swa.setdefault(worker, set())

    def tombstone(self, worker: str, hashes: Iterable[BlockHash]) -> None:
        """Drop the SWA KV of `hashes`, keep their full KV (what the radix cache does to old pages)."""
        self.swa.get(worker, set()).difference_update(hashes)

    def forget(self, worker: str) -> None:
        self.full.pop(worker, None)
        self.swa.pop(worker, None)

    def match(
        self, block_hashes: Sequence[BlockHash], workers: Iterable[str] | None = None
    ) -> dict[str, FakeMatch]:
        self.calls += 1
        out = {}
        for w in self.full if workers is None else workers:
            full, swa = self.full.get(w, set()), self.swa.get(w, set())
            raw = 0
            while raw < len(block_hashes) and block_hashes[raw] in full:
                raw += 1
            safe = raw
            while safe > 0 and not all(block_hashes[i] in swa for i in range(max(0, safe - self.need), safe)):
                safe -= 1
            out[w] = FakeMatch(raw, safe)
        return out


@dataclass
class FakeIndexSource:
    """What the router reads of a KVIndexFollower: `.index`, `.ready`, `.redis_ok`, `.forget_worker`."""

    index: FakePrefixIndex
    ready: bool = True
    redis_ok: bool = True
    forgotten: list[str] = field(default_factory=list)

    def forget_worker(self, worker_id: str) -> None:
        self.forgotten.append(worker_id)
        self.index.forget(worker_id)
