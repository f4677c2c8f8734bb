"""Frequency-aware eviction for one tier: a segmented LRU (SLRU) over keys and sizes, no values.

    new key --> [ probation: LRU ........ MRU ]  --hit-->  [ protected: LRU ........ MRU ]
                  ^ victims come from here first             | over its share (80%): the LRU end
                                                             v is demoted to probation's MRU end

A key enters probation. A hit there moves it to protected; a hit in protected refreshes it. Victims
are taken from probation's LRU end, and only from protected when probation is empty. So a flood
of one-shot keys (a scan, a burst of unique prompts) cycles through probation and never displaces
what was read again: hot prefixes survive, while protected's share cap and demotion age out keys
that stopped being hit. Every operation is O(1) (amortised for demotions).

`protected_fraction=0` is a plain LRU (every key stays in probation), the baseline in the tests.
Bookkeeping only: the tiers own the values and call `pop_victim` until they fit.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator


class SegmentedLRU:
    def __init__(self, capacity: int, protected_fraction: float = 0.8) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError("protected_fraction must be in [0, 1)")
        self.capacity = capacity
        self.protected_cap = int(capacity * protected_fraction)
        self._probation: OrderedDict[bytes, int] = OrderedDict()
        self._protected: OrderedDict[bytes, int] = OrderedDict()
        self.used = 0
        self.protected_used = 0

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def __contains__(self, key: object) -> bool:
        return key in self._probation or key in self._protected

    @property
    def over(self) -> int:
        """Bytes above capacity (what the tier must still evict)."""
        return max(0, self.used - self.capacity)

    def is_protected(self, key: bytes) -> bool:
        return key in self._protected

    def add(self, key: bytes, size: int, protected: bool = False) -> None:
        """A new key at the MRU end of its segment (protected: it was hit already, e.g. promoted)."""
        if key in self:
            raise KeyError(f"{key.hex()} already tracked")
        if protected and self.protected_cap > 0:
            self._protected[key] = size
            self.protected_used += size
            self.used += size
            self._rebalance()
        else:
            self._probation[key] = size
            self.used += size

    def hit(self, key: bytes) -> None:
        """An access: probation -> protected, protected -> its MRU end. Unknown keys are ignored."""
        if key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation:
            if self.protected_cap <= 0:
                self._probation.move_to_end(key)
                return
            size = self._probation.pop(key)
            self._protected[key] = size
            self.protected_used += size
            self._rebalance()

    def remove(self, key: bytes) -> int:
        """Forget a key; returns its size (KeyError if unknown)."""
        if key in self._probation:
            size = self._probation.pop(key)
        else:
            size = self._protected.pop(key)
            self.protected_used -= size
        self.used -= size
        return size

    def pop_victim(self) -> tuple[bytes, int]:
        """The next key to evict, removed: probation's LRU end, else protected's (IndexError if empty)."""
        if self._probation:
            key, size = self._probation.popitem(last=False)
        elif self._protected:
            key, size = self._protected.popitem(last=False)
            self.protected_used -= size
        else:
            raise IndexError("nothing to evict")
        self.used -= size
        return key, size

    def keys_hot_first(self) -> Iterator[bytes]:
        """Protected MRU..LRU, then probation MRU..LRU (the order a draining node hands keys over)."""
        yield from reversed(self._protected)
        yield from reversed(self._probation)

    def _rebalance(self) -> None:
        while self.protected_used > self.protected_cap and self._protected:
            key, size = self._protected.popitem(last=False)
            self.protected_used -= size
            self._probation[key] = size  # demoted: MRU end of probation, a last chance
