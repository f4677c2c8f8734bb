"""PageHashes: the same hashes as hash_blocks, computed only as far as they are read."""

from __future__ import annotations

import array
import random

import pytest

from services.common.block_hash import hash_blocks
from services.common.prefix_index import PrefixIndex
from services.router.page_hashes import FIRST_CHUNK, PageHashes, RecentPrompts, use_recent

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


def test_a_recent_prompt_lends_the_pages_it_shares_and_nothing_else() -> None:
    """With RecentPrompts installed, each prompt's hashes still equal hash_blocks on random
    sessions (turns that extend, branch mid-page or mid-prompt, other page sizes, unrelated
    prompts), and a turn that extends an earlier one hashes only its new pages."""
    rng = random.Random(4)
    recent = RecentPrompts(size=32)
    use_recent(recent)
    try:
        sessions = [
            array.array("I", [rng.randrange(2**32) for _ in range(rng.randrange(1, 400))]) for _ in range(4)
        ]
        for sess in sessions:
            PageHashes(sess, PAGE, len(sess) // PAGE).all()
        for _ in range(120):
            s = rng.randrange(len(sessions))
            old = sessions[s]
            r = rng.random()
            if r < 0.5:  # the next turn: everything before, and more
                new = old + array.array("I", [rng.randrange(2**32) for _ in range(rng.randrange(0, 90))])
            elif r < 0.8:  # a branch: a prefix (any length, off the page grid too), then other ids
                cut = rng.randrange(len(old) + 1)
                new = old[:cut] + array.array(
                    "I", [rng.randrange(2**32) for _ in range(rng.randrange(1, 90))]
                )
            else:
                new = array.array("I", [rng.randrange(2**32) for _ in range(rng.randrange(1, 300))])
            sessions[s] = new
            page = rng.choice([PAGE, PAGE, 4])
            count = len(new) // page
            want = hash_blocks(new, page)
            lazy = PageHashes(new, page, count)
            before = recent.reused_pages
            if rng.random() < 0.5:
                assert lazy.all() == tuple(want) and lazy.packed() == b"".join(
                    h.to_bytes(16, "big") for h in want
                )
            else:
                assert list(lazy) == want
            reused = recent.reused_pages - before
            assert lazy.computed == count - reused
            if r < 0.5 and page == PAGE and len(old) // PAGE and lazy.computed:
                assert lazy.computed <= count - len(old) // PAGE + FIRST_CHUNK  # only the new pages, about
        assert recent.reused_pages > 0
    finally:
        use_recent(None)
    assert PageHashes(sessions[0], PAGE, 1).all() == tuple(hash_blocks(sessions[0][:PAGE], PAGE))
