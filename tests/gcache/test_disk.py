"""DiskTier on real files: round trip, every kind of damage detected, budget, restart scan."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.gcache.disk import HEADER_BYTES, BlockCorrupt, DiskTier, crc32


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def put(tier: DiskTier, k: bytes, value: bytes) -> list[bytes]:
    tmp = tier.write_temp(k, value, crc32(value))
    return tier.commit(k, tmp, len(value))


def test_round_trip_layout_and_no_temp_left(tmp_path: Path):
    tier = DiskTier(tmp_path, capacity=1 << 20)
    value = os.urandom(5000)
    assert put(tier, key(1), value) == []
    path = tier.path(key(1))
    assert path == tmp_path / key(1).hex()[:2] / f"{key(1).hex()}.blk"
    assert path.stat().st_size == HEADER_BYTES + 5000 == tier.used
    assert bytes(tier.read(key(1))) == value
    header = path.read_bytes()[:HEADER_BYTES]
    assert header[:4] == b"GCB1" and header[8:24] == key(1)
    assert int.from_bytes(header[24:32], "big") == 5000 and int.from_bytes(header[32:36], "big") == crc32(
        value
    )
    assert list(tier.tmp.iterdir()) == []
    assert tier.remove(key(1)) and not path.exists() and tier.used == 0
    assert not tier.remove(key(1))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda p: flip(p, HEADER_BYTES + 100), "checksum"),  # a bit in the value
        (lambda p: flip(p, p.stat().st_size - 1), "checksum"),  # the last byte
        (lambda p: flip(p, 0), "header"),  # magic
        (lambda p: flip(p, 10), "header"),  # the key inside the file
        (lambda p: flip(p, 8 + 16 + 7), "truncated"),  # the size field
        (lambda p: os.truncate(p, p.stat().st_size - 1), "truncated"),
        (lambda p: os.truncate(p, HEADER_BYTES + 10), "truncated"),
        (lambda p: os.truncate(p, 7), "truncated"),  # not even a header
        (lambda p: p.write_bytes(p.read_bytes() + b"x"), "truncated"),  # longer than written
    ],
)
def test_damage_is_detected(tmp_path: Path, damage, reason):
    tier = DiskTier(tmp_path, capacity=1 << 20)
    put(tier, key(7), os.urandom(1000))
    damage(tier.path(key(7)))
    with pytest.raises(BlockCorrupt) as e:
        tier.read(key(7))
    assert e.value.reason == reason


def test_a_file_under_another_name_is_not_accepted(tmp_path: Path):
    tier = DiskTier(tmp_path, capacity=1 << 20)
    put(tier, key(1), b"one" * 100)
    put(tier, key(2), b"two" * 100)
    os.replace(tier.path(key(1)), tier.path(key(2)))  # key 1's file now under key 2's name
    with pytest.raises(BlockCorrupt, match="header"):
        tier.read(key(2))


def test_budget_evicts_least_recently_used_files(tmp_path: Path):
    block = HEADER_BYTES + 1000
    tier = DiskTier(tmp_path, capacity=3 * block)
    for i in range(3):
        assert put(tier, key(i), os.urandom(1000)) == []
    tier.hit(key(0))
    assert put(tier, key(3), os.urandom(1000)) == [key(1)]
    assert not tier.path(key(1)).exists() and tier.used == 3 * block
    assert sorted(int.from_bytes(k, "big") for k in tier.keys_hot_first()) == [0, 2, 3]


def test_scan_indexes_existing_blocks_oldest_first_and_removes_temps(tmp_path: Path):
    block = HEADER_BYTES + 100
    tier = DiskTier(tmp_path, capacity=10 * block)
    for i in range(4):
        put(tier, key(i), bytes([i]) * 100)
        os.utime(tier.path(key(i)), (time.time() - 100 + i, time.time() - 100 + i))  # 0 oldest
    (tier.tmp / "leftover").write_bytes(b"half a block")
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / "not-a-block.txt").write_text("ignored")
    # a restart with room for 3: the oldest goes
    again = DiskTier(tmp_path, capacity=3 * block)
    assert again.scan() == [key(0)]
    assert list(again.tmp.iterdir()) == []
    assert (tmp_path / "ab" / "not-a-block.txt").exists()
    for i in (1, 2, 3):
        assert bytes(again.read(key(i))) == bytes([i]) * 100
    assert key(0) not in again and not again.path(key(0)).exists()


def test_write_error_leaves_nothing(tmp_path: Path):
    tier = DiskTier(tmp_path, capacity=1 << 20)
    os.rmdir(tier.tmp)  # a real OSError: the temp directory is gone
    with pytest.raises(FileNotFoundError):
        tier.write_temp(key(1), b"x" * 10, 0)
    assert key(1) not in tier and tier.used == 0
