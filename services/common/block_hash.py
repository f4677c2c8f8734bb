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

Speed: `hash_blocks` is the hot path (the router hashes every usable page of a routed prompt, 5,300
pages for an 85k-token prompt). One call of a small C library (block_hash_native.c, built by
scripts/setup.sh, loaded with ctypes) builds each page's message from the ids and chains BLAKE2b
over them; where that is not built or SWASERVE_PURE_HASH is set, numpy packs the messages and
hashlib hashes one page a call; digests chain as bytes. 5,312 pages: ~1.9 ms (C) / ~2.8 ms (hashlib) against 4.4 ms page by page
before (2 shared cores; a third of it is making the 128-bit ints). tests/common/test_block_hash.py
checks both chains against the encoding written out again, on long random prompts.
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import operator
import os
import struct
from collections.abc import Callable, Sequence
from itertools import repeat
from pathlib import Path
from typing import NewType, cast

import numpy as np

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
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    extras: Sequence[bytes | None] | None = None,
    parent: BlockHash = ROOT_HASH,
) -> list[BlockHash]:
    """One chained hash per FULL page of `tokens`; a trailing partial page gets none.

    `extras[i]`, if given, is mixed into page i; entries for the partial page (if any) are ignored.
    `parent` continues a chain (hashing a suffix whose first page follows the page hashed `parent`).
    `tokens` is any sequence of ints; an `array("I")` or a numpy integer array is read without a copy.
    """
    return hashes_of(block_digests(tokens, page_size, extras, parent))


def block_digests(
    tokens: Sequence[int] | np.ndarray,
    page_size: int,
    extras: Sequence[bytes | None] | None = None,
    parent: BlockHash = ROOT_HASH,
) -> bytes:
    """`hash_blocks` as bytes: each hash's 16 big-endian bytes, back to back (what a wire that
    carries hashes as bytes wants; making the ints is a third of `hash_blocks`' time)."""
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    num_full = len(tokens) // page_size
    if extras is not None and len(extras) > -(-len(tokens) // page_size):
        raise ValueError(f"{len(extras)} extras for {len(tokens)} tokens of page size {page_size}")
    if num_full == 0:
        return b""
    ids = _uint32(tokens, num_full * page_size)
    prev = parent.to_bytes(HASH_BYTES, "big")
    plain = extras is None or all(e is None for e in extras[:num_full])
    if plain and _NATIVE_PAGES is not None:
        return _hash_pages(ids, page_size, prev)
    msgs = _page_messages(ids, page_size)
    return _chain_python(msgs, prev, None if plain else extras)


def hashes_of(digests: bytes | bytearray | memoryview) -> list[BlockHash]:
    """`block_digests`' bytes as BlockHash ints. Each hash is read as two big-endian 64-bit words
    (one struct call for all) joined as hi << 64 | lo by C-level maps: ~35% less than an
    int.from_bytes per 16-byte slice."""
    n = len(digests)
    if n % HASH_BYTES:
        raise ValueError(f"block digests: {n} bytes is not a multiple of {HASH_BYTES}")
    words = struct.unpack(f">{n // 8}Q", digests)
    return cast(
        "list[BlockHash]", list(map(operator.or_, map(operator.lshift, words[0::2], repeat(64)), words[1::2]))
    )


def _chain_python(msgs: np.ndarray, prev: bytes, extras: Sequence[bytes | None] | None = None) -> bytes:
    """The pages' digests back to back, one hashlib BLAKE2b per page. The chain is sequential, so this
    stays a Python loop; digests chain as bytes: a hash's 16 big-endian bytes ARE the next parent."""
    rows, size = msgs.shape
    view = msgs.data.cast("B")
    copy = hashlib.blake2b(_BLOCK_TAG, digest_size=HASH_BYTES).copy
    digests: list[bytes] = []
    keep = digests.append
    for i, at in enumerate(range(0, rows * size, size)):
        d = copy()
        d.update(prev)
        extra = extras[i] if extras is not None and i < len(extras) else None
        if extra is None:
            d.update(view[at : at + size])  # count | page | 0x00
        else:
            d.update(view[at : at + size - 1])
            d.update(b"\x01" + len(extra).to_bytes(4, "big"))
            d.update(extra)
        prev = d.digest()
        keep(prev)
    return b"".join(digests)


def _chain(msgs: np.ndarray, prev: bytes) -> bytes:
    """`_chain_python(msgs, prev)` in one call of the C library (block_hash_native.c)."""
    assert _NATIVE is not None
    rows, size = msgs.shape
    out = np.empty(rows * HASH_BYTES, dtype=np.uint8)
    if _NATIVE(_BLOCK_TAG, len(_BLOCK_TAG), prev, msgs.ctypes.data, rows, size, out.ctypes.data):
        raise MemoryError("block_hash_native: out of memory")
    return out.tobytes()


def _hash_pages(ids: np.ndarray, page_size: int, prev: bytes) -> bytes:
    """`_chain(_page_messages(ids, page_size), prev)` in one C call that builds each page's message
    itself (no packed copy of the prompt: ~0.3 ms less for 85k tokens)."""
    assert _NATIVE_PAGES is not None
    ids = np.ascontiguousarray(ids, dtype=np.uint32)
    pages = len(ids) // page_size
    out = bytearray(pages * HASH_BYTES)
    buf = (ctypes.c_char * len(out)).from_buffer(out)
    if _NATIVE_PAGES(_BLOCK_TAG, len(_BLOCK_TAG), prev, ids.ctypes.data, pages, page_size, buf):
        raise MemoryError("block_hash_native: out of memory")
    del buf
    return bytes(out)


def _page_messages(ids: np.ndarray, page_size: int) -> np.ndarray:
    """One row per full page: the part of its message after the parent, as bytes:
    token count | tokens as unsigned 32-bit big-endian | 0x00 (the no-extra marker)."""
    pages = len(ids) // page_size
    body = 4 * page_size
    msgs = np.zeros((pages, 4 + body + 1), dtype=np.uint8)
    msgs[:, :4] = np.frombuffer(page_size.to_bytes(4, "big"), dtype=np.uint8)
    msgs[:, 4 : 4 + body] = ids.astype(">u4", copy=False).view(np.uint8).reshape(pages, body)
    return msgs


def _load_native(name: str) -> Callable[..., int] | None:
    """A C function of the library (`swaserve_hash_chain` over packed rows, `swaserve_hash_pages`
    over token ids) if scripts/setup.sh built it and SWASERVE_PURE_HASH is unset."""
    if os.environ.get("SWASERVE_PURE_HASH"):
        return None
    try:
        lib = ctypes.CDLL(str(NATIVE_LIBRARY))
    except OSError:  # not built here (no C compiler at setup): hashlib it is
        return None
    fn = getattr(lib, name, None)
    if fn is None:  # a library built before this function existed: rebuild with scripts/setup.sh
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_void_p]  # fmt: skip
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


NATIVE_LIBRARY = Path(__file__).with_name("_block_hash_native.so")
_NATIVE = _load_native("swaserve_hash_chain")
_NATIVE_PAGES = _load_native("swaserve_hash_pages")


def _uint32(tokens: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """The first `n` token ids as a uint32 array; ValueError unless each is an int in [0, 2^32)."""
    if isinstance(tokens, array.array) and tokens.typecode in "IL" and tokens.itemsize == 4:
        return np.frombuffer(tokens, dtype=np.uint32, count=n)  # already checked by its type
    if isinstance(tokens, np.ndarray):
        head = tokens[:n]
        if head.dtype.kind not in "iu" or (head.size and (head.min() < 0 or head.max() > _MAX_TOKEN)):
            raise ValueError(f"token ids must be ints in [0, {_MAX_TOKEN}]")
        return head.astype(np.uint32, copy=False)
    try:  # array("I") checks each id the way hash_block's struct.pack does
        return np.frombuffer(array.array("I", tokens[:n]), dtype=np.uint32)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, {_MAX_TOKEN}]") from e


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
