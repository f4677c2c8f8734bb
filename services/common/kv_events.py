"""KV cache events: what a worker's cache stored, removed or cleared, as typed messages.

Cache state travels as events, never as snapshots. A worker's radix cache emits them through a
sink (any `Callable[[KVEvent], None]`; `EventBuffer` collects them) and the worker publishes them
to the router as index ops (services/common/kv_event_wire.py).

Hashes are `services.common.block_hash` block hashes of the page's whole prefix, so a consumer
needs no tree to place a block. `kind` says which KV the event is about: "full" (full-attention
layers, every token) or "swa" (sliding-window layers; an SWA page may be dropped while the full
page at the same position stays, which is a "swa" BlockRemoved alone).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import ClassVar

from services.common.block_hash import BlockHash
from services.common.kv_spec import KVKind, kv_kind


@dataclass(frozen=True)
class KVEvent:
    """Base of the three events."""

    type_name: ClassVar[str] = ""


@dataclass(frozen=True)
class BlockStored(KVEvent):
    """Consecutive pages were stored: block_hashes[i] is the page at token_ids[i*page_size:(i+1)*page_size].

    `parent_hash` is the hash of the page just before block_hashes[0] (ROOT_HASH at the start of a
    sequence). `token_ids` is FLAT: len(token_ids) == len(block_hashes) * page_size.
    """

    type_name: ClassVar[str] = "stored"
    kind: KVKind
    block_hashes: tuple[BlockHash, ...]
    parent_hash: BlockHash
    token_ids: tuple[int, ...]
    page_size: int

    def __post_init__(self) -> None:
        kv_kind(self.kind)
        if self.page_size <= 0 or len(self.token_ids) != len(self.block_hashes) * self.page_size:
            raise ValueError(
                f"{len(self.token_ids)} token ids for {len(self.block_hashes)} blocks of {self.page_size}"
            )

    def block_tokens(self, i: int) -> tuple[int, ...]:
        """The tokens of block i."""
        return self.token_ids[i * self.page_size : (i + 1) * self.page_size]


@dataclass(frozen=True)
class BlockRemoved(KVEvent):
    """The pages with these hashes are no longer cached (of this kind)."""

    type_name: ClassVar[str] = "removed"
    kind: KVKind
    block_hashes: tuple[BlockHash, ...]

    def __post_init__(self) -> None:
        kv_kind(self.kind)


@dataclass(frozen=True)
class AllCleared(KVEvent):
    """Everything this worker cached is gone."""

    type_name: ClassVar[str] = "cleared"


class EventBuffer:
    """An event sink that keeps events until drained (in emission order).

    Bounded: with nobody draining (an engine with no publisher), the oldest events are dropped and
    counted in `dropped`; a consumer that sees `dropped` grow has lost events and must resync.
    """

    def __init__(self, max_events: int = 100_000) -> None:
        if max_events < 1:
            raise ValueError("max_events must be >= 1")
        self._events: deque[KVEvent] = deque(maxlen=max_events)
        self.dropped = 0

    def __call__(self, event: KVEvent) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)

    def __len__(self) -> int:
        return len(self._events)

    def drain(self) -> list[KVEvent]:
        events = list(self._events)
        self._events.clear()
        return events


__all__ = [
    "AllCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBuffer",
    "KVEvent",
    "KVKind",
]
