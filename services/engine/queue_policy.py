"""Order of the waiting queue: a small base class plus a registry.

`uncached-first` serves requests with few tokens left to compute first (short prefills finish fast
and their TTFT dominates user experience), while an aging credit that grows with waiting time keeps
long requests from starving:

    priority = uncached_tokens - aging_tokens_per_s * waited_seconds      (lower runs first)

A request that waited `uncached / aging_tokens_per_s` seconds outranks any newly arrived request,
so waiting time is bounded by the backlog, not by the arrival stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import ClassVar

from services.engine.request import Req

UncachedFn = Callable[[Req], int]


class QueuePolicy:
    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[QueuePolicy]]] = {}

    def __init_subclass__(cls, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if cls.name:
            QueuePolicy.registry[cls.name] = cls

    def order(self, waiting: Sequence[Req], now: float, uncached: UncachedFn) -> list[Req]:
        raise NotImplementedError


class Fcfs(QueuePolicy):
    name = "fcfs"

    def order(self, waiting: Sequence[Req], now: float, uncached: UncachedFn) -> list[Req]:
        return sorted(waiting, key=lambda r: r.arrival)


class UncachedFirst(QueuePolicy):
    name = "uncached-first"

    def __init__(self, aging_tokens_per_s: float = 256.0) -> None:
        if aging_tokens_per_s <= 0:
            raise ValueError("aging_tokens_per_s must be > 0 (otherwise long requests can starve)")
        self.aging_tokens_per_s = aging_tokens_per_s

    def priority(self, req: Req, now: float, uncached: int) -> float:
        return uncached - self.aging_tokens_per_s * max(0.0, now - req.arrival)

    def order(self, waiting: Sequence[Req], now: float, uncached: UncachedFn) -> list[Req]:
        keyed = [(self.priority(r, now, uncached(r)), r.arrival, i, r) for i, r in enumerate(waiting)]
        keyed.sort(key=lambda t: t[:3])
        return [t[3] for t in keyed]


def make_queue_policy(name: str, **kw: float) -> QueuePolicy:
    cls = QueuePolicy.registry.get(name)
    if cls is None:
        raise ValueError(f"unknown queue policy {name!r}; known: {', '.join(sorted(QueuePolicy.registry))}")
    return cls(**kw)
