"""The data plane's caller side: how a big put is spread over connections, against a real node."""

from __future__ import annotations

import os

import pytest

from services.gcache.data_conn import STRIPE_BYTES, DataConn, _runs
from tests.gcache.conftest import NodeFactory, counters, rand_key

MiB = 1 << 20


@pytest.mark.parametrize(
    ("sizes", "stripes", "expected"),
    [
        ([], 2, [range(0, 0)]),
        ([MiB] * 8, 2, [range(0, 8)]),  # under 2 * STRIPE_BYTES: one run
        ([MiB] * 16, 2, [range(0, 8), range(8, 16)]),
        ([MiB] * 32, 1, [range(0, 32)]),
        ([4 * MiB] * 8, 2, [range(0, 4), range(4, 8)]),
        ([20 * MiB], 2, [range(0, 1)]),  # one item is one run
        ([12 * MiB, MiB, MiB, MiB, MiB], 2, [range(0, 1), range(1, 5)]),  # by bytes, not by count
        ([MiB] * 40, 3, [range(0, 14), range(14, 27), range(27, 40)]),
    ],
)
def test_runs_split_by_bytes_into_consecutive_ranges(sizes, stripes, expected):
    assert STRIPE_BYTES == 8 * MiB  # the table assumes it
    runs = _runs(sizes, stripes)
    assert runs == expected
    assert [i for r in runs for i in r] == list(range(len(sizes)))


def test_a_striped_put_uses_two_connections_and_keeps_item_order(start_node: NodeFactory):
    node = start_node(memory_bytes=128 * MiB, disk=False, extra=["--max-value-bytes", "2M"])
    items = [(bytes(rand_key()), os.urandom(MiB)) for _ in range(24)]
    bad = 17  # refused, in the second run: its status must come back in its place
    items[bad] = (items[bad][0], os.urandom(3 * MiB))
    conn = DataConn(f"127.0.0.1:{node.data_port}", timeout=10)
    try:
        result = conn.put(items)
        assert [st.ok for st in result.statuses] == [i != bad for i in range(len(items))]
        assert counters(node)["data_connections"] == 2  # both kept for the next call
        got = conn.get([k for k, _ in items])
        assert set(got.values) == set(range(len(items))) - {bad}
        assert all(got.values[i] == v for i, (_, v) in enumerate(items) if i != bad)
    finally:
        conn.close()


def test_a_put_repeating_a_key_is_not_striped_and_the_last_value_wins(start_node: NodeFactory):
    node = start_node(memory_bytes=128 * MiB, disk=False)
    key = bytes(rand_key())
    items = [(bytes(rand_key()), os.urandom(MiB)) for _ in range(20)]
    items[2] = (key, b"first")
    items[-1] = (key, b"last")
    conn = DataConn(f"127.0.0.1:{node.data_port}", timeout=10)
    try:
        assert all(st.ok for st in conn.put(items).statuses)
        assert counters(node)["data_connections"] == 1
        assert conn.get([key]).values[0] == b"last"
    finally:
        conn.close()
