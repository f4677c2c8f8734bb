"""L2 bookkeeping: window-safe lookups (full pages and a tail at the end), write dedupe, segmented
LRU eviction (a prefix that was used survives a scan of one-shot ones), bounded host pages."""

from __future__ import annotations

import random

from services.common.block_hash import BlockHash, hash_blocks
from services.engine.kv.host_tier import HostTier

P, W = 4, 8  # a tail covers ceil(W / P) = 2 pages (fewer at the start of a sequence)


def _hashes(seed: int, pages: int) -> list[BlockHash]:
    rng = random.Random(seed)
    return hash_blocks([rng.randrange(1000) for _ in range(pages * P)], P)


def _write(tier: HostTier, hs: list[BlockHash], end: int) -> None:
    """What the scheduler writes when the radix cache takes a prefix of `end` pages."""
    for h in hs[:end]:
        tier.store_full(h)
    tier.store_tail(hs[end - 1], tier.tail_pages(end))


def test_lookup_is_the_longest_prefix_with_all_full_pages_and_a_tail():
    tier = HostTier(64, 64, P, W)
    hs = _hashes(0, 10)
    assert tier.lookup(hs, 0) is None
    _write(tier, hs, 3)
    _write(tier, hs, 7)
    hit = tier.lookup(hs, 0)
    assert hit is not None and (hit.start, hit.end, len(hit.full), len(hit.tail)) == (0, 7, 7, 2)
    assert hit.tail_first == 5
    hit = tier.lookup(hs, 4)  # L1 already has 4 pages
    assert hit is not None and (hit.start, hit.end, len(hit.full)) == (4, 7, 3)
    assert tier.lookup(hs, 7) is None  # nothing beyond the last tail
    assert tier.lookup(_hashes(1, 10), 0) is None  # another sequence
    # a short prefix keeps its whole (short) window
    assert tier.tail_pages(1) == 1 and tier.tail_pages(2) == 2 and tier.tail_pages(9) == 2


def test_a_missing_full_page_cuts_the_hit_before_it():
    tier = HostTier(64, 64, P, W)
    hs = _hashes(2, 8)
    _write(tier, hs, 2)
    for h in hs[3:8]:
        tier.store_full(h)
    tier.store_tail(hs[7], 2)  # page 2 never written: the tail at 8 is unreachable
    hit = tier.lookup(hs, 0)
    assert hit is not None and hit.end == 2


def test_writes_are_deduplicated_and_bounded():
    tier = HostTier(6, 4, P, W)
    hs = _hashes(3, 10)
    assert tier.store_full(hs[0]) is not None and tier.store_full(hs[0]) is None
    for h in hs:
        tier.store_full(h)
    assert tier.num_full_blocks == 6 and tier.full_pool.num_free == 0 and tier.evicted_full == 4
    assert tier.store_tail(hs[5], 5) is None  # more pages than the SWA pool has
    assert tier.store_tail(hs[5], 2) is not None and tier.store_tail(hs[5], 2) is None
    assert tier.store_tail(hs[6], 2) is not None and tier.store_tail(hs[7], 2) is not None
    assert tier.num_tails == 2 and tier.evicted_tails == 1


def test_a_used_prefix_survives_a_scan_of_one_shot_prefixes():
    tier = HostTier(24, 16, P, W)
    hot = _hashes(10, 6)
    _write(tier, hot, 6)
    hit = tier.lookup(hot, 0)
    assert hit is not None
    tier.use(hot, hit)  # restored once: protected
    for seed in range(11, 30):  # a scan: many new prefixes, each seen once
        _write(tier, _hashes(seed, 6), 6)
    again = tier.lookup(hot, 0)
    assert again is not None and again.end == 6
    # without the use, the same scan evicts it (plain LRU order)
    cold_tier = HostTier(24, 16, P, W)
    _write(cold_tier, hot, 6)
    for seed in range(11, 30):
        _write(cold_tier, _hashes(seed, 6), 6)
    assert cold_tier.lookup(hot, 0) is None


def test_the_protected_segment_is_capped_and_its_oldest_go_back_to_probation():
    tier = HostTier(10, 4, 4, 8)
    keys = [BlockHash(1000 + i) for i in range(10)]
    for k in keys:
        assert tier.store_full(k) is not None
    tier.protect(keys)  # all used once, oldest first
    assert tier._full.protected_pages == 8  # 80% of 10 pages
    assert list(tier._full.probation) == keys[:2]  # the two oldest were demoted
    # a new block evicts the oldest demoted one, never a protected one
    assert tier.store_full(BlockHash(5)) is not None
    assert not tier.has_full(keys[0]) and all(tier.has_full(k) for k in keys[1:])
