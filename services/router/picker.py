"""Which worker gets a request: for now, the fewest outstanding requests from this router.

A picker ranks candidates (best first) rather than returning one, so that the dispatcher can fall
back to the next when a worker refuses or cannot be reached. Outstanding counts are this router's
own view: a request counts on a worker from `acquire` to `release`.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from typing import Protocol

from services.router.workers import WorkerInfo


class Picker(Protocol):
    def rank(self, workers: Sequence[WorkerInfo]) -> list[WorkerInfo]: ...

    def acquire(self, addr: str) -> None: ...

    def release(self, addr: str) -> None: ...


class LeastOutstandingPicker:
    """Least outstanding requests first; ties broken round-robin (the starting point rotates)."""

    def __init__(self) -> None:
        self._outstanding: defaultdict[str, int] = defaultdict(int)
        # one rotation per candidate set: prefill and decode ranks interleave, and a shared counter
        # would hand each role every other turn (always the same worker of two)
        self._turns: defaultdict[tuple[str, ...], itertools.count[int]] = defaultdict(itertools.count)

    def rank(self, workers: Sequence[WorkerInfo]) -> list[WorkerInfo]:
        if not workers:
            return []
        ordered = sorted(workers, key=lambda w: w.addr)
        start = next(self._turns[tuple(w.addr for w in ordered)]) % len(ordered)
        rotated = ordered[start:] + ordered[:start]
        return sorted(rotated, key=lambda w: self._outstanding[w.addr])  # stable: keeps the rotation

    def acquire(self, addr: str) -> None:
        self._outstanding[addr] += 1

    def release(self, addr: str) -> None:
        left = self._outstanding[addr] - 1
        if left > 0:
            self._outstanding[addr] = left
        else:
            del self._outstanding[addr]

    def outstanding(self, addr: str) -> int:
        return self._outstanding.get(addr, 0)
