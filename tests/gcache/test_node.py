"""One node process, through the real client: sizes, tiers, damage on disk, refusals, disk errors."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from services.common.redis_server import RedisServer
from services.gcache.client import GCacheClient
from tests.gcache.conftest import NodeFactory, NodeProc, counters, rand_key

MiB = 1 << 20
KiB = 1 << 10


def client(redis_server: RedisServer, nodes: int = 1, **kw) -> GCacheClient:
    c = GCacheClient(redis_server.url, shm=kw.pop("shm", False), **kw)
    assert c.wait_for_nodes(nodes)
    return c


PATHS = pytest.mark.parametrize("data_plane", [True, False], ids=["data plane", "grpc"])


def used(c: GCacheClient, data_plane: bool) -> bool:
    """Every value call went the chosen path (the data plane, or data frames in gRPC streams)."""
    n = c.counters
    chosen, other = (n.data_calls, n.grpc_calls) if data_plane else (n.grpc_calls, n.data_calls)
    return n.shm_calls == 0 and chosen > 0 and other == 0


@PATHS
def test_round_trip_of_many_sizes_and_unknown_keys(redis_server, start_node: NodeFactory, data_plane):
    start_node(memory_bytes=64 * MiB)
    sizes = [0, 1, 7, 1000, 64 * KiB, MiB - 1, MiB, MiB + 1, 4 * MiB, 4 * MiB + 5, 9 * MiB + 123]
    rng = random.Random(0)
    sizes += [rng.randrange(1, 3 * MiB) for _ in range(10)]
    values = {rand_key(): os.urandom(n) for n in sizes}
    with client(redis_server, data_plane=data_plane) as c:
        report = c.put_many(values)
        assert report.ok and report.stored == len(values)
        unknown = [rand_key() for _ in range(5)]
        got = c.get_many(list(values) + unknown)
        assert set(got) == set(values)
        for k, v in values.items():
            assert len(got[k]) == len(v) and got[k] == v
        assert c.counters.gets_missed == 5 and c.counters.shm_calls == 0
        assert c.exists_prefix(list(values)) == len(values)
        assert c.exists_prefix(list(values)[:3] + unknown[:1] + list(values)[3:]) == 3
        assert c.delete(list(values)[:2]) == 2
        assert c.get_many(list(values)[:2]) == {}
        assert used(c, data_plane)


def test_spill_promotion_and_corruption_on_disk(redis_server, start_node: NodeFactory, tmp_path: Path):
    node = start_node(memory_bytes=4 * MiB, disk_bytes=64 * MiB)
    values = [(rand_key(), os.urandom(MiB)) for _ in range(12)]
    with client(redis_server) as c:
        assert c.put_many(values).ok
        before = counters(node)
        assert before["spills_written"] >= 8 and node.stats().disk_blocks >= 8
        files = sorted((tmp_path / "n0").glob("*/*.blk"))
        assert len(files) == node.stats().disk_blocks
        # the first four went to disk first: read them back (disk hits, promoted to memory)
        got = c.get_many([k for k, _ in values[:4]])
        assert all(got[k] == v for k, v in values[:4])
        after = counters(node)
        assert after["hits_disk"] - before["hits_disk"] == 4 and after["promotions"] >= 4
        # damage two blocks that are only on disk now: flip a byte in one, truncate another
        on_disk = [
            (k, v) for k, v in values[4:] if (tmp_path / "n0" / k.hex()[:2] / f"{k.hex()}.blk").exists()
        ]
        (k_flip, _), (k_cut, _), *rest = on_disk
        p_flip = tmp_path / "n0" / k_flip.hex()[:2] / f"{k_flip.hex()}.blk"
        p_cut = tmp_path / "n0" / k_cut.hex()[:2] / f"{k_cut.hex()}.blk"
        data = bytearray(p_flip.read_bytes())
        data[len(data) // 2] ^= 0xFF
        p_flip.write_bytes(bytes(data))
        os.truncate(p_cut, p_cut.stat().st_size // 2)
        got = c.get_many([k_flip, k_cut] + [k for k, _ in rest])
        assert k_flip not in got and k_cut not in got
        assert all(got[k] == v for k, v in rest)
        end = counters(node)
        assert end["corrupt_checksum"] == 1 and end["corrupt_truncated"] == 1
        assert not p_flip.exists() and not p_cut.exists()
        assert c.exists_prefix([k_flip]) == 0
        metrics = node.metrics_text()
        assert 'swaserve_gcache_corrupt_blocks_total{reason="checksum"} 1.0' in metrics
        assert 'swaserve_gcache_hits_total{tier="disk"}' in metrics
        assert 'swaserve_gcache_used_bytes{tier="memory"}' in metrics


@PATHS
def test_oversized_values_get_an_error_and_the_rest_of_the_batch_is_stored(
    redis_server, start_node: NodeFactory, data_plane
):
    start_node(memory_bytes=8 * MiB, disk=False, extra=["--max-value-bytes", str(6 * MiB)])
    ok1, big, too_big_for_memory, ok2 = rand_key(), rand_key(), rand_key(), rand_key()
    batch = [(ok1, os.urandom(MiB)), (big, os.urandom(7 * MiB)), (ok2, os.urandom(2 * MiB))]
    with client(redis_server, data_plane=data_plane) as c:
        report = c.put_many(batch)
        assert report.stored == 2 and report.dropped == 0
        assert set(report.errors) == {big}
        assert report.errors[big].startswith("TOO_LARGE") and "--max-value-bytes" in report.errors[big]
        got = c.get_many([ok1, big, ok2])
        assert set(got) == {ok1, ok2} and got[ok1] == batch[0][1] and got[ok2] == batch[2][1]
        assert c.counters.puts_rejected == 1 and used(c, data_plane)
    # a node without disk and 1 MiB of memory: 2 MiB fits neither tier
    with RedisServer() as other:
        small = NodeProc(other.url, None, memory_bytes=MiB)
        try:
            with client(other, data_plane=data_plane) as c:
                report = c.put_many([(too_big_for_memory, bytes(2 * MiB)), (ok1, b"fine")])
                assert "fits neither tier" in report.errors[too_big_for_memory] and report.stored == 1
                assert used(c, data_plane)
        finally:
            small.kill()


@PATHS
def test_disk_write_failure_keeps_puts_in_memory_and_drops_spills(
    redis_server, start_node: NodeFactory, data_plane
):
    # RLIMIT_FSIZE of 300 KiB in the node process: every write of a bigger file fails with a real
    # EFBIG; smaller blocks still spill fine
    node = start_node(memory_bytes=2 * MiB, disk_bytes=64 * MiB, fsize_limit=300 * KiB)
    small = [(rand_key(), os.urandom(100 * KiB)) for _ in range(8)]
    large = [(rand_key(), os.urandom(512 * KiB)) for _ in range(8)]
    with client(redis_server, data_plane=data_plane) as c:
        # small blocks first, then large ones push them all out of memory: small ones spill fine
        assert c.put_many(small).ok
        report = c.put_many(large)
        assert report.ok and report.stored == 8  # the puts themselves succeed in memory
        more = [(rand_key(), os.urandom(512 * KiB)) for _ in range(4)]
        assert c.put_many(more).ok  # evicts large ones, whose spills fail
        assert counters(node)["disk_write_errors"] >= 2
        got = c.get_many([k for k, _ in small + large + more])
        st = counters(node)
        assert st["spills_failed"] >= 2 and st["disk_write_errors"] == st["spills_failed"]
        assert all(got[k] == v for k, v in small)  # spilled to disk, read back
        lost = [k for k, _ in large + more if k not in got]
        assert len(lost) == st["spills_failed"]  # exactly the blocks whose spill failed
        assert all(got[k] == v for k, v in large + more if k in got)
        # a value bigger than the memory tier must go to disk: it fails as a whole, clearly
        huge = rand_key()
        report = c.put_many([(huge, os.urandom(3 * MiB)), (rand_key(), b"ok")])
        assert report.errors[huge].startswith("DISK_FAILED") and "File too large" in report.errors[huge]
        assert report.stored == 1
        assert huge not in c.get_many([huge])
        assert counters(node)["rejected_disk_failed"] == 1 and used(c, data_plane)
    assert "spill of" in node.output() and "dropped" in node.output()


def test_disk_tier_survives_a_restart(redis_server, start_node: NodeFactory):
    node = start_node(memory_bytes=MiB, disk_bytes=16 * MiB)
    values = [(rand_key(), os.urandom(300 * KiB)) for _ in range(10)]
    with client(redis_server) as c:
        assert c.put_many(values).ok
    port = node.port
    node.kill()
    again = start_node(memory_bytes=MiB, disk_bytes=16 * MiB, port=port)  # same dir, same id
    assert again.node_id == node.node_id and again.stats().disk_blocks >= 6
    deadline = time.monotonic() + 10
    with client(redis_server) as c:
        while time.monotonic() < deadline:  # the dead node's record may linger up to its TTL
            got = c.get_many([k for k, _ in values])
            if len(got) >= 6:
                break
            time.sleep(0.2)
        assert len(got) >= 6 and all(got[k] == v for k, v in values if k in got)


@pytest.mark.parametrize(("fraction", "survives"), [("0.8", True), ("0", False)])  # SLRU vs plain LRU
def test_a_hot_block_outlives_a_flood_of_one_shot_puts(
    redis_server, start_node: NodeFactory, fraction, survives
):
    node = start_node(memory_bytes=MiB, disk=False, extra=["--protected-fraction", fraction])
    hot = rand_key()
    with client(redis_server) as c:
        assert c.put_many([(hot, b"h" * 10 * KiB)]).ok
        for _ in range(3):
            assert hot in c.get_many([hot])
        for _ in range(10):  # 1000 one-shot blocks of 10 KiB: ten times the memory tier
            assert c.put_many([(rand_key(), os.urandom(10 * KiB)) for _ in range(100)]).ok
        assert (c.get_many([hot]).get(hot) == b"h" * 10 * KiB) is survives
        assert counters(node)["evictions_memory"] >= 850  # 1001 blocks, room for ~100
