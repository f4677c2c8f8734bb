"""A prompt's page hashes, computed only as far as a lookup reads them.

The prefix index walks a prompt's chained page hashes from the first page and stops at the first
page no worker holds (services/common/prefix_index.py), so routing a prompt that matches k pages
needs k + 1 hashes, not all of them: a new 32k-token conversation behind a 2k-token system prompt
is routed on ~33 hashes instead of 512 (0.04 ms instead of 0.45).

    pages:     [ 0 .. 15 ][ 16 ........ 47 ][ 48 ..................... 111 ] ...
    computed:   1st read    then doubling chunks, each chained on the last hash before it

Chunks double (16, 32, 64, ... pages), so at most about twice what was read is hashed, in a few
hash_blocks calls. The hashes are exactly services.common.block_hash.hash_blocks(ids)[:count];
`packed()` gives them as bytes (16 big-endian each) without making or unmaking ints.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import overload

from services.common.block_hash import HASH_BYTES, ROOT_HASH, BlockHash, block_digests, hashes_of

FIRST_CHUNK = 16  # pages hashed by the first read


class PageHashes(Sequence[BlockHash]):
    """The first `count` page hashes of `ids` (pages of `page_size`), hashed on demand."""

    def __init__(self, ids: Sequence[int], page_size: int, count: int) -> None:
        if not 0 <= count <= len(ids) // page_size:
            raise ValueError(f"{count} pages of {page_size} from {len(ids)} tokens")
        self._ids = ids
        self._page = page_size
        self._count = count
        self._done: list[BlockHash] = []
        self._digests = bytearray()  # the same hashes as bytes (block_hash.block_digests)

    @property
    def computed(self) -> int:
        """Hashes computed so far."""
        return len(self._done)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> BlockHash: ...

    @overload
    def __getitem__(self, i: slice) -> list[BlockHash]: ...

    def __getitem__(self, i: int | slice) -> BlockHash | list[BlockHash]:
        if isinstance(i, slice):
            picked = range(*i.indices(self._count))
            self._extend(max(picked, default=-1) + 1)
            if picked.step > 0:
                return self._done[picked.start : picked.stop : picked.step]
            return [self._done[j] for j in picked]
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError("page hash index out of range")
        if i >= len(self._done):
            self._extend(i + 1)
        return self._done[i]

    def packed(self, count: int | None = None) -> bytes:
        """The first `count` (default all) hashes as 16 big-endian bytes each, back to back, with no
        int made or unmade (services/common/pending_wire.py's encoding)."""
        n = self._count if count is None else count
        if not 0 <= n <= self._count:
            raise IndexError(f"{n} of {self._count} page hashes")
        self._extend(n)
        return bytes(self._digests[: n * HASH_BYTES])

    def all(self) -> tuple[BlockHash, ...]:
        """Every one of the `count` hashes, in one call (hashing what is left)."""
        self._extend(self._count)
        return tuple(self._done)

    def __iter__(self) -> Iterator[BlockHash]:
        i = 0
        while i < self._count:
            if i == len(self._done):
                self._extend(i + 1)
            chunk = self._done[i:]
            yield from chunk
            i += len(chunk)

    def _extend(self, k: int) -> None:
        """Hash until at least min(k, count) hashes are known."""
        ps, done = self._page, self._done
        while len(done) < min(k, self._count):
            have = len(done)
            end = min(self._count, have + max(FIRST_CHUNK, have))
            parent = done[-1] if done else ROOT_HASH
            digests = block_digests(self._ids[have * ps : end * ps], ps, parent=parent)
            self._digests += digests
            done += hashes_of(digests)
