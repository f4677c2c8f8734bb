"""The wire of routing-time residency (pending_residency.py): one stream entry per routing decision.

    {prefix}:pending    STREAM, trimmed by age (MINID ~ now - max TTL): one entry per decision
        k    "pend" | "unpend"
        p    the decision's id (request id)
        w    the prefill worker's worker_id
        e    its incarnation (registry start_id) as the router knew it, "" if unknown
        ttl  milliseconds the entry lives after the entry's own id time (pend)
        f    the full page hashes, 16 bytes each, big-endian (pend)
        s    the SWA page hashes, same encoding (pend)

A decision is one XADD: atomic, one round trip, whatever the prompt's length. The deadline is
the entry id's time (Redis's clock) plus the TTL, so every replica expires an entry at the same
moment whatever its own clock. Kept apart from the KV-event stream (kv_event_wire.py): that one
is trimmed by count and read for its order; this one is trimmed by age and its entries are
idempotent (by pid) and checked against the worker's real state when applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Literal, cast

from services.common.block_hash import HASH_BYTES, BlockHash, hashes_of
from services.common.pending_residency import PendingEntry

PendKind = Literal["pend", "unpend"]


def pack_hashes(hashes: Sequence[BlockHash]) -> bytes:
    big: Literal["big"] = "big"
    return b"".join(map(int.to_bytes, hashes, repeat(HASH_BYTES), repeat(big)))


def unpack_hashes(data: bytes) -> tuple[BlockHash, ...]:
    if len(data) % HASH_BYTES:
        raise ValueError(f"pending hashes: {len(data)} bytes is not a multiple of {HASH_BYTES}")
    return tuple(hashes_of(data))


@dataclass(frozen=True)
class PendingMessage:
    kind: PendKind
    pid: str
    worker: str
    incarnation: str = ""
    ttl_ms: int = 0
    full: tuple[BlockHash, ...] = ()
    swa: tuple[BlockHash, ...] = ()
    # `full` already in its wire form (the router's PageHashes.packed()), or b"": packed when sent
    full_packed: bytes = field(default=b"", compare=False, repr=False)
    tokens: int = 0  # prompt tokens the worker will compute for it (pending load)

    def __post_init__(self) -> None:
        if self.full_packed and len(self.full_packed) != HASH_BYTES * len(self.full):
            raise ValueError(f"{len(self.full_packed)} packed bytes for {len(self.full)} full pages")

    def to_fields(self) -> dict[str, str | bytes]:
        f: dict[str, str | bytes] = {"k": self.kind, "p": self.pid, "w": self.worker, "e": self.incarnation}
        if self.kind == "pend":
            full = self.full_packed or pack_hashes(self.full)
            f |= {"ttl": str(self.ttl_ms), "f": full, "s": pack_hashes(self.swa), "u": str(self.tokens)}
        return f

    @staticmethod
    def peek(f: dict[bytes, bytes]) -> tuple[PendKind, str]:
        """An entry's kind and pid, without reading its pages (a reader that already holds the
        pid skips the rest: a router reading its own entries back)."""
        kind = f[b"k"].decode()
        if kind not in ("pend", "unpend"):
            raise ValueError(f"unknown pending entry kind {kind!r}")
        return cast(PendKind, kind), f[b"p"].decode()

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> PendingMessage:
        kind, pid = cls.peek(f)
        msg = cls(kind, pid, f[b"w"].decode(), f.get(b"e", b"").decode())
        if kind == "unpend":
            return msg
        full, swa = unpack_hashes(f.get(b"f", b"")), unpack_hashes(f.get(b"s", b""))
        if not full:
            raise ValueError("a pend entry without pages")
        tokens = int(f.get(b"u", b"0"))
        return cls("pend", msg.pid, msg.worker, msg.incarnation, int(f[b"ttl"]), full, swa, tokens=tokens)

    def entry(self, written_ms: int) -> PendingEntry:
        """The entry as the index holds it: deadline = the stream id's time + TTL."""
        return PendingEntry(self.pid, self.worker, self.full, self.swa, (written_ms + self.ttl_ms) / 1000,
                            self.incarnation, self.tokens, written_ms / 1000)  # fmt: skip

    @classmethod
    def of(cls, entry: PendingEntry, ttl_ms: int, full_packed: bytes = b"") -> PendingMessage:
        """`full_packed`: `entry.full` as `pack_hashes` writes it, if the caller has it already."""
        return cls("pend", entry.pid, entry.worker, entry.incarnation, ttl_ms, entry.full, entry.swa,
                   full_packed, entry.tokens)  # fmt: skip


__all__ = ["PendKind", "PendingMessage", "pack_hashes", "unpack_hashes"]
