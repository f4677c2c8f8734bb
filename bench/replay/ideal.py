"""The trace's ideal prefix-cache hit rate: an infinite cache that has seen every earlier request.

For each request in order, k = the number of its leading hash ids that appeared in any earlier
request; its hit tokens are min(k * block, input_length) (a shared partial last block counts
whole). Ideal = sum of hit tokens / sum of input tokens. Hash ids are chained, so a request's
k-th id seen before means its whole first k blocks were sent before.

No real cache beats it: a server's hit is also page-aligned, window-safe, bounded by eviction, by
which worker holds the prefix, and by the last token it must compute for the first output.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol


class BlockPrompt(Protocol):
    @property
    def input_length(self) -> int: ...
    @property
    def hash_ids(self) -> Sequence[int]: ...
    @property
    def block_size(self) -> int: ...


def ideal_hit_tokens(requests: Iterable[BlockPrompt]) -> list[int]:
    """Hit tokens of each request under an infinite cache, in the order given."""
    seen: set[int] = set()
    hits = []
    for r in requests:
        k = 0
        while k < len(r.hash_ids) and r.hash_ids[k] in seen:
            k += 1
        hits.append(min(k * r.block_size, r.input_length))
        seen.update(r.hash_ids)
    return hits


def ideal_hit_rate(requests: Sequence[BlockPrompt]) -> float:
    total = sum(r.input_length for r in requests)
    return sum(ideal_hit_tokens(requests)) / total if total else 0.0
