"""PageHashes: the same hashes as hash_blocks, computed only as far as they are read."""

from __future__ import annotations

import array
import random

import pytest

from services.common.block_hash import hash_blocks
from services.common.prefix_index import PrefixIndex
from services.router.page_hashes import FIRST_CHUNK, PageHashes

PAGE = 4


def ids(n: int, seed: int = 0) -> array.array[int]:
    rng = random.Random(seed)
    return array.array("I", [rng.randrange(2**32) for _ in range(n)])


@pytest.mark.parametrize("seed", range(5))
def test_reads_in_any_order_give_hash_blocks(seed: int) -> None:
    rng = random.Random(seed)
    tokens = ids(rng.randrange(0, 600), seed)
    count = rng.randrange(0, len(tokens) // PAGE + 1)
    want = hash_blocks(tokens, PAGE)[:count]
    lazy = PageHashes(tokens, PAGE, count)
    assert len(lazy) == count
    for i in rng.sample(range(count), min(count, 20)):  # random access first, then the rest
        assert lazy[i] == want[i] and lazy[i - count] == want[i]
    assert list(lazy) == want and lazy[3:-2] == want[3:-2] and lazy[::7] == want[::7]
    with pytest.raises(IndexError):
        lazy[count]


def test_a_read_hashes_at_most_about_twice_as_far() -> None:
    lazy = PageHashes(ids(4000), PAGE, 1000)
    assert lazy.computed == 0 and len(lazy) == 1000  # nothing hashed to know the length
    assert lazy[0] and lazy.computed == FIRST_CHUNK
    lazy[40]
    assert 41 <= lazy.computed <= 2 * 41
    for n, _ in enumerate(lazy, 1):
        if n == 300:
            break
    assert 300 <= lazy.computed <= 2 * 300


def test_the_index_reads_only_as_far_as_a_worker_matches() -> None:
    tokens = ids(4000)
    hashes = hash_blocks(tokens, PAGE)
    index = PrefixIndex(PAGE, 2 * PAGE)
    index.store("w", "full", hashes[:50])
    index.store("w", "swa", hashes[:50])
    lazy = PageHashes(tokens, PAGE, 999)
    m = index.match(lazy)["w"]
    assert (m.raw_blocks, m.safe_blocks) == (50, 50)
    assert 51 <= lazy.computed <= 2 * 51  # not 999


def test_count_beyond_the_full_pages_is_refused() -> None:
    with pytest.raises(ValueError):
        PageHashes(ids(10), PAGE, 3)


@pytest.mark.parametrize("key", [slice(None, None, -1), slice(16, 0, -1), slice(3, 40, 5), slice(-5, None)])
def test_slices_with_any_step_give_hash_blocks_slices(key: slice) -> None:
    tokens = ids(17 * PAGE + 2, seed=9)
    want = hash_blocks(tokens, PAGE)[:17]
    assert PageHashes(tokens, PAGE, 17)[key] == want[key]


def test_packed_is_the_hashes_as_big_endian_bytes() -> None:
    tokens = ids(900, 3)
    want = hash_blocks(tokens, PAGE)[:200]
    lazy = PageHashes(tokens, PAGE, 200)
    assert lazy.packed(5) == b"".join(h.to_bytes(16, "big") for h in want[:5])
    assert lazy.computed < 200  # only as far as asked
    assert lazy.packed() == b"".join(h.to_bytes(16, "big") for h in want)
    assert list(lazy) == want and lazy.packed(0) == b""
    with pytest.raises(IndexError):
        lazy.packed(201)
