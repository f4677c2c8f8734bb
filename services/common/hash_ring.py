"""Consistent hashing over named nodes, with virtual nodes: who owns a point, and its replicas.

    0 ................................................................ 2^64
       a#17     b#3   c#90     a#2        b#41    c#7    ...  (vnodes, sorted)
                 ^ point p  -> owners(p, 2) = [c, a]: the next vnodes clockwise, distinct nodes

Each node gets `vnodes` points, `point_of(f"{node}#{i}")`; a key's point is walked clockwise to the
first vnode at or after it (wrapping), then on until `n` distinct nodes are collected. Adding a node
moves only the keys whose first vnode is now one of the new node's, about 1/(N+1) of them;
removing one moves only its keys. Two processes that build a ring from the same node names (in any
order) and the same `vnodes` agree on every owner: the points come from BLAKE2b, never `hash()`.

Keys that are uniform hashes already (block hashes) may pass their own 64-bit point (e.g. the
first 8 bytes, big-endian) instead of paying for `point_of`.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

POINT_BITS = 64
DEFAULT_VNODES = 128


def point_of(data: bytes | str) -> int:
    """A 64-bit point on the ring for arbitrary bytes (BLAKE2b-64, stable everywhere)."""
    raw = data.encode() if isinstance(data, str) else data
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"swaserve.ring").digest(), "big")


class HashRing:
    """An immutable ring; build a new one when the node set changes (cheap: N * vnodes points)."""

    def __init__(self, nodes: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes <= 0:
            raise ValueError(f"vnodes must be positive, got {vnodes}")
        self.vnodes = vnodes
        self.nodes: tuple[str, ...] = tuple(sorted(set(nodes)))
        pairs = sorted((point_of(f"{node}#{i}"), node) for node in self.nodes for i in range(vnodes))
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: object) -> bool:
        return node in self.nodes

    def without(self, node: str) -> HashRing:
        """The same ring minus one node (what a draining node hands its keys over to)."""
        return HashRing((n for n in self.nodes if n != node), self.vnodes)

    def owners(self, point: int, n: int = 1) -> list[str]:
        """The first `n` distinct nodes clockwise from `point` (fewer if the ring has fewer)."""
        if not self._points or n <= 0:
            return []
        want = min(n, len(self.nodes))
        i = bisect.bisect_left(self._points, point % (1 << POINT_BITS))
        out: list[str] = []
        size = len(self._points)
        for step in range(size):
            node = self._owners[(i + step) % size]
            if node not in out:
                out.append(node)
                if len(out) == want:
                    break
        return out

    def owner(self, point: int) -> str | None:
        """The first owner of `point`, None on an empty ring."""
        found = self.owners(point, 1)
        return found[0] if found else None
