"""What the block store answers with: per-key put outcomes, found values, counters, usage."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


class PutCode(enum.IntEnum):  # the values of proto/gcache.proto PutCode
    STORED = 0
    STORED_DISK = 1
    TOO_LARGE = 2
    DISK_FAILED = 3
    INVALID = 4


@dataclass(frozen=True)
class PutOutcome:
    code: PutCode
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.code in (PutCode.STORED, PutCode.STORED_DISK)


@dataclass(frozen=True)
class Found:
    value: memoryview
    tier: str  # "memory" | "disk"


@dataclass
class StoreCounters:
    """Monotonic counts (Prometheus counters and the Stats RPC read them)."""

    puts: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    hits_memory: int = 0
    hits_disk: int = 0
    misses_memory: int = 0  # not in memory (then looked up on disk)
    misses_disk: int = 0  # in neither tier: the lookup is a miss
    evictions_memory: int = 0
    evictions_disk: int = 0
    spills_written: int = 0
    spills_skipped: int = 0  # already on disk with the same CRC: nothing to write
    spills_failed: int = 0
    spills_dropped: int = 0  # evicted from memory with no disk tier (or too big for it)
    promotions: int = 0
    disk_write_errors: int = 0
    read_errors: int = 0
    corrupt_checksum: int = 0
    corrupt_truncated: int = 0
    corrupt_header: int = 0
    rejected_too_large: int = 0
    rejected_disk_failed: int = 0
    rejected_invalid: int = 0
    deleted: int = 0
    migrated_blocks_sent: int = 0
    migrated_bytes_sent: int = 0
    migrated_blocks_received: int = 0
    migrated_bytes_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Usage:
    memory_used: int
    memory_capacity: int
    memory_blocks: int
    disk_used: int
    disk_capacity: int
    disk_blocks: int
