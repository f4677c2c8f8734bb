"""The wire of the KV-event bus: index ops, stream entries, Redis keys (docs/kv-events.md).

A KV event carries what the engine's cache knows (token ids, parent hash); the router's index needs
only (op, kind, block hashes), so that is what crosses Redis, packed as bytes:

    per op:   code (1 byte)  F store full | S store swa | f remove full | s remove swa | C clear
              count (4 bytes, big-endian)
              count block hashes, 16 bytes each, big-endian

Keys, per source (a worker's tier):

    {prefix}:{tier}:{worker}:full   set of 16-byte block hashes with full-attention KV
    {prefix}:{tier}:{worker}:swa    set of 16-byte block hashes with SWA KV
    {prefix}:{tier}:{worker}:meta   hash: e (epoch), n (seq), page_size, window, w, t, updated
    {prefix}:sources                set of "{tier}|{worker}"
    {prefix}:stream                 stream of StreamEntry fields {w, t, e, n, k, ops}
    {prefix}:pending                stream of the routers' pending entries (pending_wire.py)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.block_hash import HASH_BYTES, BlockHash, hashes_of
from services.common.prefix_index import KVKind

if TYPE_CHECKING:
    from services.common.kv_events import BlockRemoved, BlockStored, KVEvent

DEFAULT_PREFIX = "swaserve:kv"
EntryKind = Literal["ops", "resync", "beat", "left"]


@dataclass(frozen=True)
class IndexOp:
    """What the index needs of a KV event: BlockStored -> store, BlockRemoved -> remove, AllCleared -> clear."""

    op: Literal["store", "remove", "clear"]
    kind: KVKind = "full"  # meaningless for clear
    hashes: tuple[BlockHash, ...] = ()


_CODES: dict[tuple[str, str], bytes] = {
    ("store", "full"): b"F",
    ("store", "swa"): b"S",
    ("remove", "full"): b"f",
    ("remove", "swa"): b"s",
}
_OPS = {code[0]: key for key, code in _CODES.items()}
_CLEAR = ord("C")


def ops_from_events(events: Iterable[KVEvent]) -> list[IndexOp]:
    """Index ops of KV events in order, consecutive ops of one (op, kind) merged."""
    runs: list[tuple[str, KVKind, list[BlockHash]]] = []
    for ev in events:
        t = ev.type_name
        if t == "cleared":
            runs.append(("clear", "full", []))
            continue
        if t not in ("stored", "removed"):
            raise ValueError(f"not a KV event: {ev!r}")
        e = cast("BlockStored | BlockRemoved", ev)
        op = "store" if t == "stored" else "remove"
        if runs and runs[-1][0] == op and runs[-1][1] == e.kind:
            runs[-1][2].extend(e.block_hashes)
        else:
            runs.append((op, e.kind, list(e.block_hashes)))
    return [IndexOp(cast(Any, op), kind, tuple(hashes)) for op, kind, hashes in runs]


def encode_ops(ops: Sequence[IndexOp]) -> bytes:
    """Per op: a code byte (F S f s C), a 4-byte big-endian count, the 16-byte big-endian hashes."""
    parts: list[bytes] = []
    for o in ops:
        if o.op == "clear":
            parts.append(b"C\x00\x00\x00\x00")
            continue
        parts.append(_CODES[(o.op, o.kind)] + len(o.hashes).to_bytes(4, "big"))
        parts.extend(h.to_bytes(HASH_BYTES, "big") for h in o.hashes)
    return b"".join(parts)


def decode_ops(data: bytes) -> list[IndexOp]:
    out: list[IndexOp] = []
    i = 0
    while i < len(data):
        code, n = data[i], int.from_bytes(data[i + 1 : i + 5], "big")
        i += 5
        if code == _CLEAR:
            out.append(IndexOp("clear"))
            continue
        if code not in _OPS or i + n * HASH_BYTES > len(data):
            raise ValueError(f"malformed KV ops at byte {i - 5}")
        op, kind = _OPS[code]
        hashes = tuple(
            hashes_of(memoryview(data)[i : i + n * HASH_BYTES])
        )  # one struct call, no int per slice
        out.append(IndexOp(cast(Any, op), cast(KVKind, kind), hashes))
        i += n * HASH_BYTES
    return out


@dataclass(frozen=True)
class StreamEntry:
    worker: str
    tier: str
    epoch: str  # a publisher's random id: a restarted worker (same addr) is a new epoch
    seq: int  # per (worker, epoch): "ops" and "resync" entries count up by one
    kind: EntryKind
    ops: tuple[IndexOp, ...] = ()

    def to_fields(self) -> dict[str, str | bytes]:
        return {"w": self.worker, "t": self.tier, "e": self.epoch, "n": str(self.seq), "k": self.kind,
                "ops": encode_ops(self.ops)}  # fmt: skip

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> StreamEntry:
        kind = f[b"k"].decode()
        if kind not in ("ops", "resync", "beat", "left"):
            raise ValueError(f"unknown stream entry kind {kind!r}")
        return cls(f[b"w"].decode(), f[b"t"].decode(), f[b"e"].decode(), int(f[b"n"]),
                   cast(EntryKind, kind), tuple(decode_ops(f.get(b"ops", b""))))  # fmt: skip


class KVKeys:
    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix.rstrip(":")
        self.stream = f"{self.prefix}:stream"
        self.sources = f"{self.prefix}:sources"
        self.pending = f"{self.prefix}:pending"  # routing-time residency (pending_wire.py)

    def source(self, tier: str, worker: str) -> str:
        return f"{tier}|{worker}"

    def of(self, tier: str, worker: str) -> tuple[str, str, str]:
        """(full, swa, meta) keys of a source."""
        base = f"{self.prefix}:{tier}:{worker}"
        return f"{base}:full", f"{base}:swa", f"{base}:meta"


def make_client(redis_url: str, socket_timeout: float = 2.0) -> redis.Redis:
    """No client-side retries: the publisher and follower own their retry and resync logic."""
    return redis.Redis.from_url(
        redis_url, socket_timeout=socket_timeout, socket_connect_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )


def hash_members(hashes: Iterable[BlockHash]) -> list[bytes]:
    return [h.to_bytes(HASH_BYTES, "big") for h in hashes]


def member_hashes(members: Iterable[bytes]) -> list[BlockHash]:
    return [BlockHash(int.from_bytes(m, "big")) for m in members]


def id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as (milliseconds, sequence), for ordering."""
    s = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = s.partition("-")
    return int(ms), int(seq or 0)


__all__ = [
    "DEFAULT_PREFIX",
    "EntryKind",
    "IndexOp",
    "KVKeys",
    "StreamEntry",
    "decode_ops",
    "encode_ops",
    "hash_members",
    "id_tuple",
    "make_client",
    "member_hashes",
    "ops_from_events",
]
