"""HashRing: stable owners, distinct replicas, ~1/(N+1) of keys move when a node joins, balance."""

from __future__ import annotations

import random

import pytest

from services.common.hash_ring import HashRing, point_of


def points(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


def test_owners_do_not_depend_on_node_order_or_process():
    a = HashRing(["n1", "n2", "n3"])
    b = HashRing(["n3", "n1", "n2", "n1"])
    assert a.nodes == b.nodes == ("n1", "n2", "n3")
    for p in points(500):
        assert a.owners(p, 2) == b.owners(p, 2)
    # stable across processes and versions (BLAKE2b, not hash()): pinned values, never to change,
    # or clients and nodes of different versions would disagree on every owner
    assert point_of("n1#0") == point_of(b"n1#0") == 16105000622505866117
    assert HashRing(["a", "b", "c"]).owners(12345678901234567, 3) == ["b", "a", "c"]


@pytest.mark.parametrize(
    ("nodes", "n", "expected_len"),
    [
        ([], 1, 0),
        (["a"], 1, 1),
        (["a"], 3, 1),
        (["a", "b"], 2, 2),
        (["a", "b", "c"], 2, 2),
        (["a", "b", "c"], 5, 3),
    ],
)
def test_replicas_are_distinct_and_capped(nodes, n, expected_len):
    ring = HashRing(nodes, vnodes=16)
    for p in points(200):
        got = ring.owners(p, n)
        assert len(got) == expected_len
        assert len(set(got)) == len(got)
        assert got[:1] == ([ring.owner(p)] if nodes else [])


def test_owner_is_first_vnode_clockwise():
    ring = HashRing(["a", "b"], vnodes=4)
    vnodes = sorted((point_of(f"{n}#{i}"), n) for n in ("a", "b") for i in range(4))
    for p, node in vnodes:
        assert ring.owner(p) == node  # exactly on a vnode
        assert ring.owner(p - 1) == node  # just before it
    assert ring.owner(vnodes[-1][0] + 1) == vnodes[0][1]  # past the last vnode: wraps


def test_adding_a_node_moves_about_one_over_n_plus_one_and_only_to_it():
    keys = points(20000, seed=1)
    for n in (2, 4, 8):
        before = HashRing([f"node-{i}" for i in range(n)])
        after = HashRing([f"node-{i}" for i in range(n + 1)])
        moved = [p for p in keys if before.owner(p) != after.owner(p)]
        assert all(after.owner(p) == f"node-{n}" for p in moved)
        expected = 1 / (n + 1)
        assert abs(len(moved) / len(keys) - expected) < 0.35 * expected, (n, len(moved) / len(keys))


def test_removing_a_node_moves_only_its_keys():
    ring = HashRing([f"node-{i}" for i in range(5)])
    smaller = ring.without("node-2")
    assert "node-2" not in smaller and len(smaller) == 4
    for p in points(5000, seed=2):
        if ring.owner(p) != "node-2":
            assert smaller.owner(p) == ring.owner(p)
        else:
            assert smaller.owner(p) == ring.owners(p, 2)[1]  # the next replica takes over


def test_128_vnodes_balance_within_a_third():
    ring = HashRing([f"10.0.0.{i}:7600" for i in range(8)])
    counts: dict[str, int] = {}
    keys = points(40000, seed=3)
    for p in keys:
        owner = ring.owner(p)
        assert owner is not None
        counts[owner] = counts.get(owner, 0) + 1
    share = len(keys) / 8
    assert len(counts) == 8
    assert all(abs(c - share) < share / 3 for c in counts.values()), counts


def test_bad_vnodes():
    with pytest.raises(ValueError):
        HashRing(["a"], vnodes=0)
