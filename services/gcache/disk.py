"""The disk tier: one file per block under `root`, bounded bytes, SLRU, checksummed, atomic writes.

    root/ab/ab12...ef.blk     a block, named by its key's 32 hex digits (first two: the subdir)
    root/tmp/<hex>.<uuid>     a block being written; renamed into place when complete

File layout (all of it counts against the budget):

    magic b"GCB1" | version u32 | key 16 B | value size u64 | CRC-32 of the value u32 | 4 B zero | value

A write goes to tmp/, then `rename` puts it in place atomically: a reader sees the old file or the
new one, never half of one, and a crash leaves only a temp file (removed at the next start). No
fsync: after a power loss a renamed file may hold garbage, which the checksum turns into a miss.
Every read checks magic, version, key, that the file is exactly header + size bytes, and the CRC;
anything else raises `BlockCorrupt` (the store deletes the file and counts it). At start the tier
indexes the files it finds, oldest first, without reading them (checked when read).

Thread model: `write_temp` and `read` do I/O and may run outside the store's lock; everything that
changes the index or names (`commit`, `remove`, `discard`) runs under it.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.gcache.keys import KEY_BYTES, BlockKey
from services.gcache.policy import SegmentedLRU

log = logging.getLogger(__name__)

MAGIC = b"GCB1"
VERSION = 1
HEADER = struct.Struct(">4sI16sQI4x")
HEADER_BYTES = HEADER.size  # 40
SUFFIX = ".blk"

Buffer = bytes | bytearray | memoryview


class BlockCorrupt(Exception):
    """A block file that is not exactly what was written; `reason`: truncated | header | checksum."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class DiskEntry:
    size: int  # value bytes

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.size


def crc32(value: Buffer) -> int:
    return zlib.crc32(value) & 0xFFFFFFFF


def _write_all(fd: int, views: list[memoryview]) -> None:
    pending = [v for v in views if len(v)]
    while pending:
        n = os.writev(fd, pending)
        while n and pending:
            if n >= len(pending[0]):
                n -= len(pending.pop(0))
            else:
                pending[0] = pending[0][n:]
                n = 0


class DiskTier:
    def __init__(self, root: str | Path, capacity: int, protected_fraction: float = 0.8) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.capacity = capacity
        self.policy = SegmentedLRU(capacity, protected_fraction)
        self._index: dict[bytes, DiskEntry] = {}
        self.tmp.mkdir(parents=True, exist_ok=True)

    # -- naming ----------------------------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / (h + SUFFIX)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    @property
    def used(self) -> int:
        return self.policy.used

    def entry(self, key: bytes) -> DiskEntry | None:
        return self._index.get(key)

    # -- start -----------------------------------------------------------------------------------
    def scan(self) -> list[bytes]:
        """Index the blocks already on disk (oldest first), drop temp files; returns keys evicted
        because the files exceed the budget."""
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)
        found: list[tuple[float, BlockKey, int]] = []
        for sub in self.root.iterdir():
            if sub == self.tmp or not sub.is_dir() or len(sub.name) != 2:
                continue
            for f in sub.iterdir():
                name = f.name
                if not name.endswith(SUFFIX) or len(name) != 2 * KEY_BYTES + len(SUFFIX):
                    continue
                try:
                    key = BlockKey.from_hex(name[: -len(SUFFIX)])
                    st = f.stat()
                except (ValueError, OSError):
                    continue
                if st.st_size < HEADER_BYTES:
                    f.unlink(missing_ok=True)
                    continue
                found.append((st.st_mtime, key, st.st_size - HEADER_BYTES))
        for _, bkey, size in sorted(found):
            self._index[bkey] = DiskEntry(size)
            self.policy.add(bkey, HEADER_BYTES + size)
        evicted = self._make_room(0)
        if found:
            log.info("disk tier %s: %d blocks found, %d bytes", self.root, len(self._index), self.used)
        return evicted

    # -- I/O (no lock) ---------------------------------------------------------------------------
    def write_temp(self, key: bytes, value: Buffer, crc: int) -> Path:
        """Write a complete block file under tmp/; raises OSError (ENOSPC, EFBIG, EIO...), leaving nothing."""
        tmp = self.tmp / f"{key.hex()}.{uuid.uuid4().hex}"
        header = HEADER.pack(MAGIC, VERSION, bytes(key), len(value), crc)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, [memoryview(header), memoryview(value).cast("B")])
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        return tmp

    def read(self, key: bytes) -> memoryview:
        """A block's value, verified; FileNotFoundError if gone, BlockCorrupt if bad."""
        with open(self.path(key), "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            buf = bytearray(size)
            got = f.readinto(buf)
        if size < HEADER_BYTES or got != size:
            raise BlockCorrupt("truncated", f"{key.hex()}: file of {size} bytes, read {got}")
        magic, version, fkey, vsize, crc = HEADER.unpack_from(buf)
        if magic != MAGIC or version != VERSION or fkey != key:
            raise BlockCorrupt("header", f"{key.hex()}: bad magic, version or key")
        if vsize != size - HEADER_BYTES:
            raise BlockCorrupt(
                "truncated", f"{key.hex()}: header says {vsize} bytes, file holds {size - HEADER_BYTES}"
            )
        value = memoryview(buf)[HEADER_BYTES:]
        if crc32(value) != crc:
            raise BlockCorrupt("checksum", f"{key.hex()}: CRC-32 mismatch")
        return value.toreadonly()

    # -- index (under the store's lock) ----------------------------------------------------------
    def commit(self, key: bytes, tmp: Path, size: int, protected: bool = False) -> list[bytes]:
        """Rename a written temp file into place and index it; returns the keys evicted for room.
        Raises OSError if the rename fails (the temp file is removed)."""
        if key in self._index:
            self.remove(key)
        evicted = self._make_room(HEADER_BYTES + size)
        path = self.path(key)
        try:
            path.parent.mkdir(exist_ok=True)
            os.rename(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self._index[key] = DiskEntry(size)
        self.policy.add(key, HEADER_BYTES + size, protected=protected)
        return evicted

    def discard(self, tmp: Path) -> None:
        tmp.unlink(missing_ok=True)

    def hit(self, key: bytes) -> None:
        self.policy.hit(key)

    def remove(self, key: bytes) -> bool:
        """Forget a block and unlink its file."""
        if self._index.pop(key, None) is None:
            return False
        self.policy.remove(key)
        try:
            self.path(key).unlink(missing_ok=True)
        except OSError as e:  # a file we cannot delete is still out of the index
            log.warning("disk tier: could not unlink %s: %s", key.hex(), e)
        return True

    def keys_hot_first(self) -> Iterator[bytes]:
        return self.policy.keys_hot_first()

    def _make_room(self, incoming: int) -> list[bytes]:
        evicted: list[bytes] = []
        while self.policy.used + incoming > self.capacity and len(self.policy):
            key, _ = self.policy.pop_victim()
            self._index.pop(key, None)
            try:
                self.path(key).unlink(missing_ok=True)
            except OSError as e:
                log.warning("disk tier: could not unlink %s: %s", key.hex(), e)
            evicted.append(key)
        return evicted
