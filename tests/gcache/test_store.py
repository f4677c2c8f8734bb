"""BlockStore in process, on real files: spill and promotion, outcomes, corruption, frequency, races."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

from services.gcache.disk import HEADER_BYTES
from services.gcache.store import BlockStore, PutCode, StoreConfig

KB = 1024


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def store(tmp_path: Path | None, memory: int, disk: int = 0, **kw) -> BlockStore:
    return BlockStore(StoreConfig(memory, tmp_path, disk if tmp_path else 0, **kw))


def test_spill_to_disk_and_promote_back(tmp_path: Path):
    s = store(tmp_path, memory=4 * KB, disk=64 * KB)
    values = {i: os.urandom(KB) for i in range(6)}
    for i, v in values.items():
        assert s.put(key(i), v).code == PutCode.STORED
    u = s.usage()
    assert (u.memory_blocks, u.memory_used, u.disk_blocks) == (4, 4 * KB, 2)
    assert s.counters.spills_written == 2 and s.counters.evictions_memory == 2
    assert s.disk is not None and s.disk.path(key(0)).exists() and s.disk.path(key(1)).exists()
    found = s.get(key(0))
    assert found is not None and found.tier == "disk" and bytes(found.value) == values[0]
    assert s.counters.promotions == 1 and s.counters.hits_disk == 1
    # promoted: in memory now (hit again from memory), and still on disk, so evicting it later
    # costs no write
    again = s.get(key(0))
    assert again is not None and again.tier == "memory"
    assert s.disk.path(key(0)).exists()
    for i, v in values.items():
        f = s.get(key(i))
        assert f is not None and bytes(f.value) == v
    assert s.get(key(99)) is None
    c = s.counters
    assert c.misses_disk == 1 and c.misses_memory >= 2 and c.spills_skipped >= 1


def test_value_bigger_than_memory_goes_straight_to_disk(tmp_path: Path):
    s = store(tmp_path, memory=4 * KB, disk=64 * KB)
    big = os.urandom(10 * KB)
    assert s.put(key(1), big).code == PutCode.STORED_DISK
    assert s.usage().memory_blocks == 0
    f = s.get(key(1))
    assert f is not None and f.tier == "disk" and bytes(f.value) == big
    assert s.usage().memory_blocks == 0  # too big to promote


def test_too_large_outcomes(tmp_path: Path):
    s = store(tmp_path, memory=4 * KB, disk=16 * KB, max_value_bytes=12 * KB)
    over_limit = s.put(key(1), bytes(13 * KB))
    assert over_limit.code == PutCode.TOO_LARGE and "--max-value-bytes" in over_limit.error
    no_disk = store(None, memory=4 * KB)
    too_big = no_disk.put(key(2), bytes(5 * KB))
    assert too_big.code == PutCode.TOO_LARGE and "fits neither tier" in too_big.error
    assert no_disk.put(key(3), bytes(4 * KB)).code == PutCode.STORED  # exactly the memory budget
    assert s.counters.rejected_too_large == 1 and no_disk.counters.rejected_too_large == 1
    bad = s.put(b"short", b"x")
    assert bad.code == PutCode.INVALID and s.counters.rejected_invalid == 1


def test_without_disk_evicted_blocks_are_dropped():
    s = store(None, memory=2 * KB)
    for i in range(3):
        s.put(key(i), bytes(KB))
    assert s.get(key(0)) is None
    assert s.counters.spills_dropped == 1 and s.counters.evictions_memory == 1


def test_corrupt_and_truncated_blocks_are_misses_deleted_and_counted(tmp_path: Path):
    s = store(tmp_path, memory=KB, disk=64 * KB)
    for i in range(4):
        s.put(key(i), os.urandom(KB))  # 0, 1, 2 spill; 3 stays in memory
    assert s.disk is not None
    p0, p1 = s.disk.path(key(0)), s.disk.path(key(1))
    data = bytearray(p0.read_bytes())
    data[HEADER_BYTES + 5] ^= 0x80
    p0.write_bytes(bytes(data))
    os.truncate(p1, p1.stat().st_size - 10)
    assert s.get(key(0)) is None and s.get(key(1)) is None
    assert not p0.exists() and not p1.exists()
    c = s.counters
    assert (c.corrupt_checksum, c.corrupt_truncated, c.misses_disk) == (1, 1, 2)
    assert not s.contains(key(0)) and s.contains(key(2))
    assert s.get(key(2)) is not None  # undamaged neighbours still hit


def test_hot_block_survives_a_scan_of_one_shot_puts(tmp_path: Path):
    for fraction, survives in ((0.8, True), (0.0, False)):
        s = store(None, memory=16 * KB, protected_fraction=fraction)
        s.put(key(0), b"h" * KB)
        for _ in range(3):
            assert s.get(key(0)) is not None
        for i in range(1, 200):
            s.put(key(i), bytes(KB))
        assert (s.get(key(0)) is not None) is survives, fraction


def test_put_again_replaces_value_and_stale_disk_copy(tmp_path: Path):
    s = store(tmp_path, memory=KB, disk=64 * KB)
    s.put(key(1), b"a" * KB)
    s.put(key(2), b"b" * KB)  # 1 spills
    assert s.disk is not None and key(1) in s.disk
    s.put(key(1), b"c" * KB)  # new value: the disk copy is stale and goes
    f = s.get(key(1))
    assert f is not None and bytes(f.value) == b"c" * KB
    s.put(key(3), b"d" * KB)  # evicts 1 again -> spill writes the new value
    f = s.get(key(1))
    assert f is not None and bytes(f.value) == b"c" * KB


def test_delete_removes_every_tier(tmp_path: Path):
    s = store(tmp_path, memory=KB, disk=64 * KB)
    s.put(key(1), bytes(KB))
    s.put(key(2), bytes(KB))
    assert s.delete(key(1)) and s.delete(key(2))
    assert not s.delete(key(1))
    assert s.get(key(1)) is None and s.get(key(2)) is None
    assert s.usage().disk_blocks == 0 and s.counters.deleted == 2


def test_concurrent_puts_gets_deletes_never_return_wrong_bytes(tmp_path: Path):
    s = store(tmp_path, memory=32 * KB, disk=128 * KB)

    def value(i: int, version: int) -> bytes:
        return (i * 1000 + version).to_bytes(8, "big") * 256  # 2 KiB, content tells key and version

    errors: list[str] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            i = rng.randrange(60)
            op = rng.random()
            if op < 0.45:
                s.put(key(i), value(i, rng.randrange(3)))
            elif op < 0.95:
                f = s.get(key(i))
                if f is not None and bytes(f.value) not in {value(i, v) for v in range(3)}:
                    errors.append(f"key {i}: bytes of another key")
            else:
                s.delete(key(i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    u = s.usage()
    assert u.memory_used <= 32 * KB and u.disk_used <= 128 * KB
    assert s.disk is not None and list(s.disk.tmp.iterdir()) == []
    on_disk = {p.name for p in tmp_path.glob("*/*.blk")}
    assert on_disk == {f"{k.hex()}.blk" for k in s.disk.keys_hot_first()}  # index and files agree


def test_drain_order_and_put_tracking(tmp_path: Path):
    s = store(tmp_path, memory=2 * KB, disk=64 * KB)
    for i in range(4):
        s.put(key(i), bytes(KB))  # 0, 1 on disk; 2, 3 in memory
    s.get(key(2))
    assert s.keys_hot_first()[:2] == [key(2), key(3)]
    assert sorted(s.keys_hot_first()) == [key(i) for i in range(4)]
    assert s.track_puts() == set()
    s.put(key(9), b"x")
    assert s.track_puts() == {key(9)}
    assert s.track_puts() == set()
    f = s.peek(key(0))
    assert f is not None and f.tier == "disk" and s.counters.hits_disk == 0 and s.counters.promotions == 0
