"""A node's block store: a memory tier spilling into a disk tier, transport-free (the gRPC servicer
and the drain call it).

    put ──> memory (SLRU, bounded) ──evicted──> spill ──> disk (SLRU, bounded) ──evicted──> gone
                 ^                                           │
                 └──────────── promoted on a disk hit ───────┘   (the disk copy stays: a later
                                                                  eviction needs no rewrite)

Outcomes, per key (docs/gcache.md has the full table):
  put   STORED (memory) | STORED_DISK (bigger than the memory tier, written straight to disk) |
        TOO_LARGE (over --max-value-bytes or bigger than both tiers) | DISK_FAILED (needed the
        disk and the write failed) | INVALID (bad key). A spill that fails (ENOSPC, EFBIG, EIO)
        does not fail the put that caused it: that block was leaving memory anyway, so it is
        simply gone, counted in disk_write_errors and spills_failed.
  get   memory hit | disk hit (checksum verified, promoted) | miss: unknown, or the file was
        corrupt / truncated (deleted, counted in corrupt_*), or unreadable (read_errors).

Locking: one lock guards the dicts, the policies and the counters; file I/O and CRCs run outside
it. A block on its way to disk stays readable in `_pending` until renamed into place; a write that
lost a race (the key was deleted or put again meanwhile) is discarded, never renamed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from services.gcache.disk import HEADER_BYTES, BlockCorrupt, Buffer, DiskTier, crc32
from services.gcache.keys import KEY_BYTES
from services.gcache.policy import SegmentedLRU
from services.gcache.results import Found, PutCode, PutOutcome, StoreCounters, Usage

__all__ = ["BlockStore", "Found", "PutCode", "PutOutcome", "StoreConfig", "StoreCounters", "Usage"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreConfig:
    memory_bytes: int
    disk_dir: Path | None = None
    disk_bytes: int = 0
    max_value_bytes: int = 64 << 20
    protected_fraction: float = 0.8

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.disk_bytes < 0 or self.max_value_bytes <= 0:
            raise ValueError("memory_bytes and disk_bytes must be >= 0, max_value_bytes > 0")

    @property
    def has_disk(self) -> bool:
        return self.disk_dir is not None and self.disk_bytes > 0


@dataclass
class _MemEntry:
    value: memoryview
    hits: int = 0
    on_disk: bool = False  # promoted from disk: the disk copy holds these bytes, no spill needed


class BlockStore:
    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._mem: dict[bytes, _MemEntry] = {}
        self._policy = SegmentedLRU(config.memory_bytes, config.protected_fraction)
        self._pending: dict[bytes, _MemEntry] = {}  # evicted from memory, being written to disk
        self.disk: DiskTier | None = None
        if config.has_disk:
            assert config.disk_dir is not None
            self.disk = DiskTier(config.disk_dir, config.disk_bytes, config.protected_fraction)
            self.disk.scan()
        self.counters = StoreCounters()
        self._tracking: set[bytes] | None = None

    # -- put -------------------------------------------------------------------------------------
    def check_put(self, key: bytes, size: int) -> PutOutcome | None:
        """The rejection a put of this size would get before any byte is read, or None."""
        cfg = self.config
        if len(key) != KEY_BYTES:
            return PutOutcome(PutCode.INVALID, f"a key is {KEY_BYTES} bytes, got {len(key)}")
        if size < 0:
            return PutOutcome(PutCode.INVALID, f"negative size {size}")
        if size > cfg.max_value_bytes:
            return PutOutcome(
                PutCode.TOO_LARGE,
                f"value of {size} bytes exceeds the node's --max-value-bytes {cfg.max_value_bytes}",
            )
        disk_room = cfg.disk_bytes - HEADER_BYTES if self.disk is not None else -1
        if size > cfg.memory_bytes and size > disk_room:
            return PutOutcome(
                PutCode.TOO_LARGE,
                f"value of {size} bytes fits neither tier (memory {cfg.memory_bytes}, disk {max(disk_room, 0)})",
            )
        return None

    def put(self, key: bytes, value: Buffer) -> PutOutcome:
        """Store a value (the store keeps the buffer: the caller must not change it afterwards)."""
        view = memoryview(value).cast("B").toreadonly()
        rejected = self.check_put(key, len(view))
        if rejected is not None:
            self._count_rejection(rejected)
            return rejected
        key = bytes(key)
        if len(view) > self.config.memory_bytes:
            return self._put_disk(key, view)
        with self._lock:
            old = self._mem.pop(key, None)
            if old is not None:
                self._policy.remove(key)
            self._pending.pop(key, None)
            if self.disk is not None:
                self.disk.remove(key)  # whatever it held may differ from the new value
            self._mem[key] = _MemEntry(view, hits=1 if old is not None else 0)
            self._policy.add(key, len(view), protected=old is not None)
            self._count_put(key, len(view))
            victims = self._evict_memory()
        self._spill(victims)
        return PutOutcome(PutCode.STORED)

    def _put_disk(self, key: bytes, view: memoryview) -> PutOutcome:
        assert self.disk is not None  # check_put: bigger than memory means it fits the disk
        try:
            tmp = self.disk.write_temp(key, view, crc32(view))
        except OSError as e:
            with self._lock:
                self.counters.disk_write_errors += 1
                self.counters.rejected_disk_failed += 1
            log.warning("gcache: put of %s straight to disk failed: %s", key.hex(), e)
            return PutOutcome(
                PutCode.DISK_FAILED, f"value of {len(view)} bytes needs the disk tier: {e.strerror or e}"
            )
        with self._lock:
            if self._mem.pop(key, None) is not None:
                self._policy.remove(key)
            self._pending.pop(key, None)
            try:
                evicted = self.disk.commit(key, tmp, len(view))
            except OSError as e:
                self.counters.disk_write_errors += 1
                self.counters.rejected_disk_failed += 1
                return PutOutcome(PutCode.DISK_FAILED, f"rename into the disk tier failed: {e.strerror or e}")
            self.counters.evictions_disk += len(evicted)
            self._count_put(key, len(view))
        return PutOutcome(PutCode.STORED_DISK)

    def _count_put(self, key: bytes, size: int) -> None:
        self.counters.puts += 1
        self.counters.bytes_in += size
        if self._tracking is not None:
            self._tracking.add(key)

    def _count_rejection(self, outcome: PutOutcome) -> None:
        with self._lock:
            if outcome.code == PutCode.TOO_LARGE:
                self.counters.rejected_too_large += 1
            else:
                self.counters.rejected_invalid += 1

    def _evict_memory(self) -> list[tuple[bytes, _MemEntry]]:
        """Evict until memory fits; returns the blocks to write to disk (under the lock)."""
        victims = []
        while self._policy.over:
            key, size = self._policy.pop_victim()
            entry = self._mem.pop(key)
            self.counters.evictions_memory += 1
            if entry.on_disk and self.disk is not None and key in self.disk:
                self.counters.spills_skipped += 1
            elif self.disk is not None and HEADER_BYTES + size <= self.disk.capacity:
                self._pending[key] = entry
                victims.append((key, entry))
            else:
                self.counters.spills_dropped += 1
        return victims

    def _spill(self, victims: list[tuple[bytes, _MemEntry]]) -> None:
        for key, entry in victims:
            assert self.disk is not None
            try:
                tmp = self.disk.write_temp(key, entry.value, crc32(entry.value))
            except OSError as e:
                with self._lock:
                    if self._pending.get(key) is entry:
                        del self._pending[key]
                    self.counters.disk_write_errors += 1
                    self.counters.spills_failed += 1
                log.warning("gcache: spill of %s to disk failed (block dropped): %s", key.hex(), e)
                continue
            with self._lock:
                if self._pending.get(key) is not entry:  # deleted or put again meanwhile
                    self.disk.discard(tmp)
                    continue
                del self._pending[key]
                try:
                    evicted = self.disk.commit(key, tmp, len(entry.value), protected=entry.hits > 0)
                except OSError as e:
                    self.counters.disk_write_errors += 1
                    self.counters.spills_failed += 1
                    log.warning("gcache: spill of %s: rename failed (block dropped): %s", key.hex(), e)
                    continue
                self.counters.evictions_disk += len(evicted)
                self.counters.spills_written += 1

    # -- get -------------------------------------------------------------------------------------
    def get(self, key: bytes) -> Found | None:
        with self._lock:
            entry = self._mem.get(key) or self._pending.get(key)
            if entry is not None:
                if key in self._mem:
                    self._policy.hit(key)
                entry.hits += 1
                self.counters.hits_memory += 1
                self.counters.bytes_out += len(entry.value)
                return Found(entry.value, "memory")
            self.counters.misses_memory += 1
        found = self._read_disk(key)
        if found is None:
            with self._lock:
                self.counters.misses_disk += 1
            return None
        with self._lock:
            self.counters.hits_disk += 1
            self.counters.bytes_out += len(found.value)
            victims = self._promote(key, found)
        self._spill(victims)
        return found

    def _read_disk(self, key: bytes) -> Found | None:
        """Read and verify a disk block; a bad one is deleted and counted (None)."""
        if self.disk is None:
            return None
        with self._lock:
            entry = self.disk.entry(key)
        if entry is None:
            return None
        try:
            value = self.disk.read(key)
        except BlockCorrupt as e:
            with self._lock:
                if self.disk.entry(key) is entry:
                    self.disk.remove(key)
                name = f"corrupt_{e.reason}"
                setattr(self.counters, name, getattr(self.counters, name) + 1)
            log.warning("gcache: corrupt block deleted: %s", e)
            return None
        except FileNotFoundError:
            with self._lock:
                if self.disk.entry(key) is entry:  # removed behind our back: forget it
                    self.disk.remove(key)
            return None
        except OSError as e:
            with self._lock:
                self.counters.read_errors += 1
            log.warning("gcache: reading %s from disk failed: %s", key.hex(), e)
            return None
        return Found(value, "disk")

    def _promote(self, key: bytes, found: Found) -> list[tuple[bytes, _MemEntry]]:
        assert self.disk is not None
        if key not in self.disk:  # deleted or replaced while we read it: serve it, do not keep it
            return []
        self.disk.hit(key)
        size = len(found.value)
        if key in self._mem or key in self._pending or size > self.config.memory_bytes:
            return []
        self._mem[key] = _MemEntry(found.value, hits=1, on_disk=True)
        self._policy.add(key, size, protected=True)
        self.counters.promotions += 1
        return self._evict_memory()

    def peek(self, key: bytes) -> Found | None:
        """A block's value without counting a hit or promoting it (the drain reads this way)."""
        with self._lock:
            entry = self._mem.get(key) or self._pending.get(key)
            if entry is not None:
                return Found(entry.value, "memory")
        return self._read_disk(key)

    # -- the rest --------------------------------------------------------------------------------
    def contains(self, key: bytes) -> bool:
        """In memory or on disk (a disk block is checked only when read)."""
        with self._lock:
            return key in self._mem or key in self._pending or (self.disk is not None and key in self.disk)

    def delete(self, key: bytes) -> bool:
        with self._lock:
            found = False
            if self._mem.pop(key, None) is not None:
                self._policy.remove(key)
                found = True
            found = self._pending.pop(key, None) is not None or found
            if self.disk is not None:
                found = self.disk.remove(key) or found
            self.counters.deleted += found
            return found

    def keys_hot_first(self) -> list[bytes]:
        """Every key, memory first (hot to cold), then disk-only ones (hot to cold)."""
        with self._lock:
            out = list(self._policy.keys_hot_first()) + list(self._pending)
            if self.disk is not None:
                seen = set(out)
                out += [k for k in self.disk.keys_hot_first() if k not in seen]
            return out

    def track_puts(self) -> set[bytes]:
        """Start (or restart) recording the keys put from now on; returns those recorded so far."""
        with self._lock:
            seen, self._tracking = self._tracking or set(), set()
            return seen

    def count_migration(self, direction: str, blocks: int, nbytes: int) -> None:
        with self._lock:
            name = f"migrated_blocks_{direction}"
            setattr(self.counters, name, getattr(self.counters, name) + blocks)
            name = f"migrated_bytes_{direction}"
            setattr(self.counters, name, getattr(self.counters, name) + nbytes)

    def counters_snapshot(self) -> dict[str, int]:
        with self._lock:
            return self.counters.as_dict()

    def usage(self) -> Usage:
        with self._lock:
            return Usage(
                memory_used=self._policy.used,
                memory_capacity=self.config.memory_bytes,
                memory_blocks=len(self._mem),
                disk_used=self.disk.used if self.disk is not None else 0,
                disk_capacity=self.disk.capacity if self.disk is not None else 0,
                disk_blocks=len(self.disk) if self.disk is not None else 0,
            )
