"""The one block hash of swaserve: router, engine, GCache keys and bench all use these functions.

A prompt is cut into pages of `page_size` tokens; each FULL page gets a hash chained on the hash of
the page before it, so a block hash names the whole prefix ending at that page, not just its tokens.
A trailing partial page has no hash (nothing caches partial pages).

    tokens:  [ page 0 ][ page 1 ][ page 2 ][ partial ]
    hashes:     h0 ------> h1 ------> h2               h_i = hash_block(h_{i-1}, page_i, extra_i)
                ^ parent = ROOT_HASH

Canonical encoding (version 1), fed to BLAKE2b with a 16-byte digest:

    b"swaserve.block.v1"                 domain tag (17 bytes)
    parent.to_bytes(16, "big")           the previous page's hash (ROOT_HASH = 0 for page 0)
    len(tokens).to_bytes(4, "big")       number of tokens in the page
    each token .to_bytes(4, "big")       token ids, unsigned 32-bit big-endian
    b"\\x00"                              when extra is None, else
    b"\\x01" + len(extra).to_bytes(4, "big") + extra

The digest, read as a big-endian unsigned integer, is the `BlockHash` (128 bits). On the wire it is
written as 32 lowercase hex digits (`hash_to_hex` / `hash_from_hex`): JSON numbers cannot hold it.

`extra` mixes other content into a page: a multimodal item's hash for every page the item's
placeholder tokens touch (`item_extras` builds the per-page list), so the same placeholder ids
with different images never share a hash. Hashes never use Python's `hash()`: they are stable
across processes, machines and Python versions.
"""

from __future__ import annotations

import array
import hashlib
import struct
import sys
from collections.abc import Sequence
from typing import NewType

BlockHash = NewType("BlockHash", int)
"""Chained hash of a token page and everything before it (128-bit unsigned int)."""

ItemHash = NewType("ItemHash", int)
"""Hash of a multimodal item's bytes (128-bit unsigned int); a different domain from BlockHash."""

ROOT_HASH = BlockHash(0)
"""The parent of the first page of every sequence."""

HASH_BYTES = 16
_BLOCK_TAG = b"swaserve.block.v1"
_ITEM_TAG = b"swaserve.item.v1"
_MAX_TOKEN = 2**32 - 1


def hash_block(parent: BlockHash, tokens: Sequence[int], extra: bytes | None = None) -> BlockHash:
    """The hash of one page of `tokens` following the page hashed `parent` (see module doc)."""
    n = len(tokens)
    try:
        packed = struct.pack(f">{n}I", *tokens)
    except struct.error as e:
        raise ValueError(f"token ids must be ints in [0, {_MAX_TOKEN}]") from e
    h = hashlib.blake2b(digest_size=HASH_BYTES)
    h.update(_BLOCK_TAG)
    h.update(parent.to_bytes(HASH_BYTES, "big"))
    h.update(n.to_bytes(4, "big"))
    h.update(packed)
    if extra is None:
        h.update(b"\x00")
    else:
        h.update(b"\x01" + len(extra).to_bytes(4, "big"))
        h.update(extra)
    return BlockHash(int.from_bytes(h.digest(), "big"))


def hash_blocks(
    tokens: Sequence[int],
    page_size: int,
    extras: Sequence[bytes | None] | None = None,
    parent: BlockHash = ROOT_HASH,
) -> list[BlockHash]:
    """One chained hash per FULL page of `tokens`; a trailing partial page gets none.

    `extras[i]`, if given, is mixed into page i; entries for the partial page (if any) are ignored.
    `parent` continues a chain (hashing a suffix whose first page follows the page hashed `parent`).
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    num_full = len(tokens) // page_size
    if extras is not None and len(extras) > -(-len(tokens) // page_size):
        raise ValueError(f"{len(extras)} extras for {len(tokens)} tokens of page size {page_size}")
    packed = _pack_tokens(tokens[: num_full * page_size])  # one pass; pages are slices of it
    base = hashlib.blake2b(_BLOCK_TAG, digest_size=HASH_BYTES)
    count = page_size.to_bytes(4, "big")
    step = 4 * page_size
    out: list[BlockHash] = []
    h = parent
    # one reused message per page: parent | count | tokens | 0x00 (a single update without an extra)
    msg = bytearray(HASH_BYTES + 4 + step + 1)
    msg[HASH_BYTES : HASH_BYTES + 4] = count
    body = memoryview(msg)[HASH_BYTES + 4 : HASH_BYTES + 4 + step]
    header = memoryview(msg)[:-1]  # parent | count | tokens, for a page with an extra
    for i in range(num_full):
        d = base.copy()
        msg[:HASH_BYTES] = h.to_bytes(HASH_BYTES, "big")
        body[:] = packed[i * step : (i + 1) * step]
        extra = extras[i] if extras is not None and i < len(extras) else None
        if extra is None:
            d.update(msg)
        else:
            d.update(header)
            d.update(b"\x01" + len(extra).to_bytes(4, "big"))
            d.update(extra)
        h = BlockHash(int.from_bytes(d.digest(), "big"))
        out.append(h)
    return out


def _pack_tokens(tokens: Sequence[int]) -> memoryview:
    """Token ids as unsigned 32-bit big-endian, the encoding `hash_block` feeds."""
    try:
        arr = array.array("I", tokens)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, {_MAX_TOKEN}]") from e
    if arr.itemsize != 4:  # pragma: no cover - no such platform in use; keep the encoding exact
        return memoryview(struct.pack(f">{len(tokens)}I", *tokens))
    if sys.byteorder == "little":
        arr.byteswap()
    return memoryview(arr).cast("B")


def hash_item(data: bytes) -> ItemHash:
    """The hash of a multimodal item's raw bytes (BLAKE2b-128 over a domain tag and the bytes)."""
    h = hashlib.blake2b(_ITEM_TAG, digest_size=HASH_BYTES)
    h.update(data)
    return ItemHash(int.from_bytes(h.digest(), "big"))


def item_extras(
    num_tokens: int, page_size: int, items: Sequence[tuple[ItemHash, int, int]]
) -> list[bytes | None]:
    """Per-page extras for `hash_blocks`: each item `(hash, start, end)` occupies token positions
    [start, end) and is mixed into every page it touches, in the order given; pages touched by no
    item get None. Returns one entry per page, the partial page included."""
    num_pages = -(-num_tokens // page_size)
    parts: list[list[bytes]] = [[] for _ in range(num_pages)]
    for item, start, end in items:
        if not 0 <= start < end <= num_tokens:
            raise ValueError(f"item span [{start}, {end}) outside [0, {num_tokens})")
        for page in range(start // page_size, (end - 1) // page_size + 1):
            parts[page].append(item.to_bytes(HASH_BYTES, "big"))
    return [b"".join(p) if p else None for p in parts]


def hash_to_hex(h: BlockHash | ItemHash) -> str:
    """The wire form of a hash: 32 lowercase hex digits."""
    return f"{h:0{2 * HASH_BYTES}x}"


def hash_from_hex(s: str) -> BlockHash:
    """Parse `hash_to_hex`'s output back into a BlockHash."""
    if len(s) != 2 * HASH_BYTES:
        raise ValueError(f"a block hash is {2 * HASH_BYTES} hex digits, got {s!r}")
    return BlockHash(int(s, 16))
