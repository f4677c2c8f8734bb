"""SegmentedLRU: victim order, promotion on hit, hot keys surviving floods that plain LRU loses."""

from __future__ import annotations

import pytest

from services.gcache.policy import SegmentedLRU


def k(i: int) -> bytes:
    return i.to_bytes(16, "big")


def fill_and_evict(policy: SegmentedLRU, new: list[int], size: int = 1) -> list[int]:
    """Add keys, evicting until within capacity; returns the evicted keys in order."""
    evicted = []
    for i in new:
        policy.add(k(i), size)
        while policy.over:
            key, _ = policy.pop_victim()
            evicted.append(int.from_bytes(key, "big"))
    return evicted


@pytest.mark.parametrize(
    ("fraction", "hits", "expected_evicted"),
    [
        (0.8, [], [0, 1, 2]),  # no hits: plain LRU order
        (0.8, [0], [1, 2, 3]),  # 0 was read again: protected, the others go first
        (0.8, [0, 1], [2, 3, 4]),
        (0.0, [0], [1, 2, 3]),  # plain LRU: a hit only refreshes recency (0 is now MRU)
    ],
)
def test_victim_order(fraction, hits, expected_evicted):
    p = SegmentedLRU(capacity=5, protected_fraction=fraction)
    fill_and_evict(p, [0, 1, 2, 3, 4])
    for i in hits:
        p.hit(k(i))
    assert fill_and_evict(p, [10, 11, 12]) == expected_evicted
    assert p.used == 5 and len(p) == 5


def test_hot_key_outlives_a_flood_of_one_shot_keys_which_plain_lru_does_not():
    slru, lru = SegmentedLRU(100, 0.8), SegmentedLRU(100, 0.0)
    for p in (slru, lru):
        fill_and_evict(p, [0])
        for _ in range(5):
            p.hit(k(0))
        fill_and_evict(p, list(range(1, 1001)))  # ten times the capacity, each key seen once
    assert k(0) in slru
    assert k(0) not in lru


def test_protected_share_is_capped_and_demoted_keys_age_out():
    p = SegmentedLRU(capacity=10, protected_fraction=0.5)  # protected holds at most 5 bytes
    fill_and_evict(p, list(range(10)))
    for i in range(8):
        p.hit(k(i))  # 8 hits, but only 5 fit in protected: 0, 1, 2 demoted back to probation
    assert p.protected_used == 5
    assert [i for i in range(10) if p.is_protected(k(i))] == [3, 4, 5, 6, 7]
    # probation now (LRU first): 8, 9, 0, 1, 2 -> victims in that order, protected untouched
    assert fill_and_evict(p, [20, 21, 22, 23, 24]) == [8, 9, 0, 1, 2]


def test_sizes_remove_and_empty():
    p = SegmentedLRU(capacity=100)
    p.add(k(1), 30)
    p.add(k(2), 50, protected=True)
    assert (p.used, p.protected_used, p.over) == (80, 50, 0)
    p.add(k(3), 40)
    assert p.over == 20
    assert p.remove(k(2)) == 50 and p.used == 70 and p.protected_used == 0
    with pytest.raises(KeyError):
        p.add(k(1), 1)
    with pytest.raises(KeyError):
        p.remove(k(9))
    assert p.pop_victim() == (k(1), 30)
    assert p.pop_victim() == (k(3), 40)
    with pytest.raises(IndexError):
        p.pop_victim()
    p.hit(k(7))  # unknown: ignored
    assert p.used == 0 and len(p) == 0


def test_victims_come_from_protected_only_when_probation_is_empty():
    p = SegmentedLRU(capacity=4, protected_fraction=0.75)
    fill_and_evict(p, [0, 1, 2, 3])
    for i in (0, 1, 2):
        p.hit(k(i))
    assert p.pop_victim()[0] == k(3)
    assert p.pop_victim()[0] == k(0)  # protected's LRU end


def test_hot_first_order():
    p = SegmentedLRU(capacity=10)
    fill_and_evict(p, [0, 1, 2, 3])
    p.hit(k(1))
    p.hit(k(3))
    assert [int.from_bytes(x, "big") for x in p.keys_hot_first()] == [3, 1, 2, 0]
