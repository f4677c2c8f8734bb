"""GCache keys: 16 bytes, typed. Raw bytes in proto/gcache.proto, 32 hex digits in logs and files.

A key is a 128-bit block hash (`services.common.block_hash`) or a string hashed to 128 bits. Block
hashes name token content only, so callers that share a GCache between models (or store more than
one kind of block per hash, e.g. full-attention KV and the SWA tail ending at the same page) derive
keys in a namespace: `BlockKey.for_block(h, "mimo-v2-flash/full")`. Keys are uniform by
construction, so the ring uses their first 8 bytes as the point (`ring_point`).
"""

from __future__ import annotations

import hashlib

from services.common.block_hash import HASH_BYTES, BlockHash

KEY_BYTES = HASH_BYTES  # 16
_NS_PERSON = b"swaserve.gc.ns"
_STR_PERSON = b"swaserve.gc.str"


class BlockKey(bytes):
    """Exactly 16 bytes; equal to and hashed like the same plain bytes, so dicts accept either."""

    __slots__ = ()

    def __new__(cls, raw: bytes | bytearray | memoryview) -> BlockKey:
        b = bytes(raw)
        if len(b) != KEY_BYTES:
            raise ValueError(f"a GCache key is {KEY_BYTES} bytes, got {len(b)}")
        return super().__new__(cls, b)

    @classmethod
    def for_block(cls, h: BlockHash | int, namespace: str = "") -> BlockKey:
        """The key of a block hash; with a namespace, a BLAKE2b-128 of namespace and hash."""
        raw = int(h).to_bytes(KEY_BYTES, "big")
        if not namespace:
            return cls(raw)
        d = hashlib.blake2b(digest_size=KEY_BYTES, person=_NS_PERSON)
        d.update(namespace.encode())
        d.update(b"\x00")
        d.update(raw)
        return cls(d.digest())

    @classmethod
    def for_str(cls, s: str) -> BlockKey:
        """The key of an arbitrary string (BLAKE2b-128 of its UTF-8)."""
        return cls(hashlib.blake2b(s.encode(), digest_size=KEY_BYTES, person=_STR_PERSON).digest())

    @classmethod
    def from_hex(cls, s: str) -> BlockKey:
        if len(s) != 2 * KEY_BYTES:
            raise ValueError(f"a GCache key is {2 * KEY_BYTES} hex digits, got {s!r}")
        return cls(bytes.fromhex(s))

    @property
    def ring_point(self) -> int:
        return int.from_bytes(self[:8], "big")

    def __repr__(self) -> str:
        return f"BlockKey({self.hex()})"

    def __str__(self) -> str:
        return self.hex()


KeyLike = BlockKey | bytes | int
"""What the client accepts: a BlockKey, 16 raw bytes, or a 128-bit block hash."""


def as_key(k: KeyLike) -> BlockKey:
    if isinstance(k, BlockKey):
        return k
    if isinstance(k, int):
        return BlockKey.for_block(k)
    return BlockKey(k)
