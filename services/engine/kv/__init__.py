"""KV bookkeeping of the engine: page pools, the window-safe radix cache and its events.

The event types live in services/common/kv_events.py (the router consumes them) and are re-exported
here. Ids and lengths only: nothing here imports torch or numpy, so bench/ reuses it in simulated workers.
"""

from services.common.kv_events import AllCleared, BlockRemoved, BlockStored, EventBuffer, KVEvent, KVKind
from services.engine.kv.page_pool import OutOfPages, PagePool
from services.engine.kv.radix_cache import InsertResult, MatchResult, RadixCache
from services.engine.kv.radix_node import RadixNode

__all__ = [
    "AllCleared",
    "BlockRemoved",
    "BlockStored",
    "EventBuffer",
    "InsertResult",
    "KVEvent",
    "KVKind",
    "MatchResult",
    "OutOfPages",
    "PagePool",
    "RadixCache",
    "RadixNode",
]
