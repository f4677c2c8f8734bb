"""The same-host path: chosen automatically, identical bytes, off by flag or for another host, and
the arena's pieces (slots, quarantine, orphan sweep, a node that cannot map it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.gcache.arena import ArenaError, ArenaMap, ClientArena, sweep_orphans
from services.gcache.client import GCacheClient
from tests.gcache.conftest import NodeFactory, counters, rand_key

MiB = 1 << 20


def values(sizes: list[int]) -> dict[bytes, bytes]:
    return {rand_key(): os.urandom(n) for n in sizes}


def test_colocated_client_uses_shm_and_gets_identical_bytes(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=128 * MiB, disk=False)
    data = values([0, 1, 4096, MiB, 4 * MiB, 5 * MiB + 3])
    with GCacheClient(redis_server.url, shm_bytes=64 * MiB, shm_slots=2) as c:
        assert c.wait_for_nodes(1)
        assert c.put_many(data).ok
        got = c.get_many(list(data) + [rand_key()])
        assert set(got) == set(data) and all(got[k] == v for k, v in data.items())
        total = sum(len(v) for v in data.values())
        assert c.counters.shm_calls == 2 and c.counters.grpc_calls == 0
        assert c.counters.shm_bytes == 2 * total and c.counters.grpc_bytes == 0
        st = counters(node)
        assert st["shm_bytes_in"] == total and st["shm_bytes_out"] == total and st["shm_arenas"] == 1
        # the same keys over the data plane and over gRPC (clients with shm off) read the same bytes
    for data_plane in (True, False):
        with GCacheClient(redis_server.url, shm=False, data_plane=data_plane) as plain:
            assert plain.wait_for_nodes(1)
            again = plain.get_many(list(data))
            assert all(again[k] == v for k, v in data.items())
            moved = plain.counters.data_bytes if data_plane else plain.counters.grpc_bytes
            assert plain.counters.shm_calls == 0 and moved == total


def test_values_beyond_a_slot_go_as_data_frames(redis_server, start_node: NodeFactory):
    start_node(memory_bytes=64 * MiB, disk=False)
    data = values([3 * MiB, MiB, MiB, 512 * 1024])  # slots of 2 MiB: the first goes alone, inline
    with GCacheClient(redis_server.url, shm_bytes=4 * MiB, shm_slots=2) as c:
        assert c.wait_for_nodes(1)
        assert c.put_many(data).ok
        got = c.get_many(list(data))  # one slot of 2 MiB: what does not fit streams
        assert all(got[k] == v for k, v in data.items())
        assert c.counters.shm_bytes > 0 and c.counters.grpc_bytes >= 3 * MiB


@pytest.mark.parametrize("how", ["flag", "other host"])
def test_shm_is_not_used_when_off_or_on_another_host(redis_server, start_node: NodeFactory, how):
    node = start_node(memory_bytes=32 * MiB, disk=False)
    kw = {"shm": False} if how == "flag" else {"host_id": "some-other-machine"}
    data = values([MiB, 100])
    with GCacheClient(redis_server.url, **kw) as c:
        assert c.wait_for_nodes(1)
        assert c.put_many(data).ok
        got = c.get_many(list(data))
        assert all(got[k] == v for k, v in data.items())
        assert c.counters.shm_calls == 0 and c.counters.data_calls == 2 and c.counters.grpc_calls == 0
        assert (c.arena is None) is (how == "flag")
    assert counters(node)["shm_bytes_in"] == 0


def test_a_node_that_cannot_map_the_arena_makes_the_client_fall_back(redis_server, start_node: NodeFactory):
    # a node started with another /dev/shm-like directory: the client's arena is not there for it
    node = start_node(memory_bytes=32 * MiB, disk=False, extra=["--host-id", "shared"])
    data = values([MiB, 10])
    with GCacheClient(redis_server.url, host_id="shared", shm_bytes=8 * MiB) as c:
        assert c.wait_for_nodes(1)
        assert c.arena is not None
        os.rename(c.arena.path, c.arena.path.with_name(c.arena.name + "-hidden"))  # as if on another host
        try:
            assert c.put_many(data).ok
            got = c.get_many(list(data))
        finally:
            os.rename(c.arena.path.with_name(c.arena.name + "-hidden"), c.arena.path)
        assert all(got[k] == v for k, v in data.items())
        assert c.counters.shm_refusals == 1 and c.counters.shm_calls == 0 and c.counters.data_calls == 2
    assert counters(node)["shm_bytes_in"] == 0


def test_slots_and_quarantine(tmp_path: Path):
    arena = ClientArena(4 * 4096, slots=2, shm_dir=tmp_path, quarantine=0.2)
    try:
        a, b = arena.acquire(), arena.acquire()
        assert a is not None and b is not None and {a.offset, b.offset} == {0, 8192}
        assert arena.acquire() is None
        arena.release(a)
        again = arena.acquire()
        assert again is not None and again.index == a.index
        arena.release(again, failed=True)  # the node may still be copying: not reused at once
        assert arena.acquire() is None
        time.sleep(0.25)
        assert arena.acquire() is not None
    finally:
        arena.close()
    assert not arena.path.exists()


def test_node_side_checks_and_orphan_sweep(tmp_path: Path):
    arenas = ArenaMap(shm_dir=tmp_path, sweep_interval=0)
    with pytest.raises(ArenaError, match="not a GCache arena"):
        arenas.view("../etc/passwd")
    with pytest.raises(ArenaError, match="cannot open"):
        arenas.view(f"swaserve-gcache-{os.getpid()}-{'0' * 32}")
    arena = ClientArena(8192, slots=1, shm_dir=tmp_path)
    view = arenas.view(arena.name)
    assert len(view) == 8192
    with pytest.raises(ArenaError, match="outside"):
        arenas.region(arena.name, 8000, 500)
    arena.view[:5] = b"hello"
    assert bytes(arenas.region(arena.name, 0, 5)) == b"hello"  # really shared
    # an arena whose creator died: swept; ours (alive) stays
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f"swaserve-gcache-{int(dead.stdout)}-{'a' * 32}"
    orphan.write_bytes(b"x")
    assert sweep_orphans(tmp_path) == [orphan.name]
    assert arena.path.exists()
    arena.close()
    arenas.sweep()
    assert len(arenas) == 0  # its name is gone: the node let go of its mapping
    arenas.close()
