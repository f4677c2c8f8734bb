"""KV events through a real redis-server: publisher -> Redis sets + stream -> follower's PrefixIndex.

Workers here are real RadixCaches (the engine's, no torch) driven by random inserts and evictions;
the last test publishes from a real prefill worker running the tiny MiMo model.
"""

from __future__ import annotations

import contextlib
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from services.common.block_hash import BlockHash, hash_blocks
from services.common.kv_event_bus import KVEventPublisher, KVIndexFollower
from services.common.kv_event_wire import (
    IndexOp,
    KVKeys,
    StreamEntry,
    decode_ops,
    encode_ops,
    make_client,
    ops_from_events,
)
from services.common.kv_events import AllCleared, BlockRemoved, BlockStored, EventBuffer
from services.common.prefix_index import WorkerMatch
from services.common.redis_server import RedisServer
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import RadixCache

PS, W = 4, 8
FAST = {"heartbeat_s": 0.2}


@pytest.fixture
def redis_server():
    with RedisServer() as server:
        yield server


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def cache_truth(cache: RadixCache) -> tuple[frozenset[BlockHash], frozenset[BlockHash]]:
    full = frozenset(h for n in cache.nodes for h in n.hashes)
    swa = frozenset(
        h for n in cache.nodes for h, s in zip(n.hashes, n.swa_pages, strict=True) if s is not None
    )
    return full, swa


class SimWorker:
    """A radix cache changed at random, publishing its events like a prefill worker's loop does."""

    def __init__(self, url: str, wid: str, seed: int, max_events: int = 100_000, **kw) -> None:
        self.wid = wid
        self.rng = random.Random(seed)
        self.full_pool, self.swa_pool = PagePool(48, PS, "full"), PagePool(48, PS, "swa")
        self.events = EventBuffer(max_events)
        self.cache = RadixCache(PS, W, self.full_pool, self.swa_pool, self.events)
        base = [[self.rng.randrange(40) for _ in range(40)] for _ in range(3)]
        self.prompts = base + [b[:16] + [self.rng.randrange(40) for _ in range(12)] for b in base]
        self.pub = KVEventPublisher(
            url, wid, PS, W, snapshot_fn=lambda: cache_truth(self.cache), **(FAST | kw)
        )
        self.pub.publish_buffer(self.events)  # the loop's first call: the initial (empty) state

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            tokens = self.rng.choice(self.prompts)[: self.rng.randrange(1, 11) * PS]
            k = len(tokens) // PS
            if self.full_pool.num_free < k:
                self.cache.evict_full(k)
            if self.swa_pool.num_free < k:
                self.cache.evict_swa(k)
            if self.full_pool.num_free >= k and self.swa_pool.num_free >= k:
                full, swa = self.full_pool.alloc(k), self.swa_pool.alloc(k)
                self.cache.insert(tokens, full, [s if self.rng.random() < 0.6 else None for s in swa])
                self.full_pool.decref(full)
                self.swa_pool.decref(swa)
            if self.rng.random() < 0.3:
                self.cache.evict_swa(self.rng.randrange(1, 5))
            if self.rng.random() < 0.02:
                self.cache.reset()
            self.pub.publish_buffer(self.events)

    def truth(self):
        return cache_truth(self.cache)

    def check_matches(self, follower: KVIndexFollower) -> None:
        for p in self.prompts:
            m = self.cache.match(p)
            got = follower.index.match(hash_blocks(p, PS), [self.wid])[self.wid]
            assert (got.raw_blocks * PS, got.safe_blocks * PS) == (m.raw_len, m.safe_len)


def settle(follower: KVIndexFollower, *workers: SimWorker) -> None:
    for w in workers:
        assert w.pub.flush(10), f"{w.wid} did not flush"
    assert follower.sync(10)


# ---- wire --------------------------------------------------------------------------------------


def test_ops_merge_and_round_trip_the_wire():
    h = hash_blocks(list(range(24)), PS)
    events = [
        BlockStored("full", tuple(h[:3]), BlockHash(0), tuple(range(12)), PS),
        BlockStored("full", tuple(h[3:5]), h[2], tuple(range(12, 20)), PS),
        BlockStored("swa", tuple(h[4:5]), h[3], tuple(range(16, 20)), PS),
        BlockRemoved("swa", (h[4],)),
        AllCleared(),
        BlockRemoved("full", tuple(h[:2])),
    ]
    ops = ops_from_events(events)
    assert ops == [
        IndexOp("store", "full", tuple(h[:5])),
        IndexOp("store", "swa", (h[4],)),
        IndexOp("remove", "swa", (h[4],)),
        IndexOp("clear"),
        IndexOp("remove", "full", tuple(h[:2])),
    ]
    assert decode_ops(encode_ops(ops)) == ops
    assert len(encode_ops(ops)) == 5 * 5 + 16 * 9
    entry = StreamEntry("127.0.0.1:5000", "l1", "ab12", 7, "ops", tuple(ops))
    wire = {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in entry.to_fields().items()}
    assert StreamEntry.from_fields(wire) == entry
    with pytest.raises(ValueError):
        decode_ops(b"F\x00\x00\x00\x02" + b"\x00" * 16)  # two hashes announced, one sent


def test_decode_ops_reads_what_the_encoding_spells_out_on_random_ops() -> None:
    """decode_ops (one struct call per op) against the wire format read byte by byte."""
    rng = random.Random(5)
    for _ in range(50):
        ops = []
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.1:
                ops.append(IndexOp("clear"))
                continue
            hashes = tuple(
                BlockHash(rng.choice([0, 2**128 - 1, rng.getrandbits(128)]))
                for _ in range(rng.randrange(0, 700))
            )
            ops.append(IndexOp(rng.choice(["store", "remove"]), rng.choice(["full", "swa"]), hashes))
        data = encode_ops(ops)
        want, i = [], 0
        while i < len(data):
            code, n = chr(data[i]), int.from_bytes(data[i + 1 : i + 5], "big")
            hs = tuple(int.from_bytes(data[i + 5 + 16 * j : i + 21 + 16 * j], "big") for j in range(n))
            want.append(("C", ()) if code == "C" else (code, hs))
            i += 5 + 16 * n
        got = [
            ("C", ())
            if o.op == "clear"
            else (
                {"store": "F", "remove": "f"}[o.op]
                if o.kind == "full"
                else {"store": "S", "remove": "s"}[o.op],
                o.hashes,
            )
            for o in decode_ops(data)
        ]
        assert got == want and decode_ops(data) == ops


# ---- round trips -------------------------------------------------------------------------------


def test_follower_mirrors_workers_and_a_later_follower_builds_the_same_index(redis_server):
    a, b = SimWorker(redis_server.url, "10.0.0.1:7001", 1), SimWorker(redis_server.url, "10.0.0.2:7001", 2)
    first = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
    try:
        assert first.ready
        for _ in range(30):
            a.step(3)
            b.step(3)
        settle(first, a, b)
        assert first.index.state() == {a.wid: a.truth(), b.wid: b.truth()}
        assert first.events_applied > 0
        a.check_matches(first)
        b.check_matches(first)
        later = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
        try:
            assert later.ready and later.index.state() == first.index.state()
            for _ in range(10):
                a.step(2)
            settle(first, a)
            assert later.sync(10)
            assert later.index.state() == first.index.state() == {a.wid: a.truth(), b.wid: b.truth()}
            q = hash_blocks(a.prompts[0], PS)
            assert later.index.match(q) == first.index.match(q)
        finally:
            later.close()
    finally:
        first.close()
        a.pub.close()
        b.pub.close()


def test_stream_gaps_and_replays_reload_from_the_sets(redis_server):
    a = SimWorker(redis_server.url, "w-a", 3)
    f = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
    r = make_client(redis_server.url)
    keys = KVKeys()
    try:
        a.step(10)
        settle(f, a)
        bogus = BlockHash(12345)
        for seq, what in ((a.pub._acked, "a replayed seq"), (a.pub._acked + 5, "a gap")):
            reloads = f.reloads
            entry = StreamEntry(a.wid, "l1", a.pub.epoch, seq, "ops", (IndexOp("store", "full", (bogus,)),))
            r.xadd(keys.stream, entry.to_fields())  # type: ignore[arg-type]
            assert f.sync(5)
            assert bogus not in f.index.blocks(a.wid)[0], what
            assert f.index.state() == {a.wid: a.truth()}
            assert f.reloads == reloads + (what == "a gap")
    finally:
        f.close()
        a.pub.close()
        r.close()


def test_dropped_events_make_the_publisher_resync(redis_server):
    a = SimWorker(redis_server.url, "w-drops", 4, max_events=3)
    f = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
    try:
        a.step(5)
        settle(f, a)
        resyncs = a.pub.resyncs
        for _ in range(6):  # events pile up in the tiny buffer, nobody drains it
            tokens = a.prompts[0][: 8 * PS]
            if a.full_pool.num_free < 8:
                a.cache.evict_full(8)
            if a.swa_pool.num_free < 8:
                a.cache.evict_swa(8)
            full, swa = a.full_pool.alloc(8), a.swa_pool.alloc(8)
            a.cache.insert(tokens, full, swa)
            a.full_pool.decref(full)
            a.swa_pool.decref(swa)
            a.cache.evict_swa(2)
        assert a.events.dropped > 0
        a.pub.publish_buffer(a.events)
        settle(f, a)
        assert a.pub.resyncs == resyncs + 1 and a.events.dropped == 0
        assert f.index.state() == {a.wid: a.truth()}
        a.check_matches(f)
    finally:
        f.close()
        a.pub.close()


def test_redis_restart_mid_stream_publisher_resyncs_and_follower_converges(redis_server):
    port = redis_server.port
    a = SimWorker(redis_server.url, "w-restart", 5, max_pending=40)
    b = SimWorker(redis_server.url, "w-steady", 6)
    f = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
    try:
        a.step(10)
        b.step(10)
        settle(f, a, b)
        before = f.index.state()
        q = hash_blocks(a.prompts[0], PS)
        answer = f.index.match(q)
        redis_server.stop()
        for _ in range(20):  # publishing while Redis is down: buffered, then too much: resync due
            a.step(2)
        assert wait_for(lambda: not f.redis_ok and f.redis_errors > 0 and not a.pub.redis_ok, 5)
        assert f.index.state() == before and f.index.match(q) == answer  # the last index, kept
        assert f.lag_seconds > 0
        redis_server.start()  # same port, empty
        assert redis_server.port == port
        for _ in range(5):
            a.step(1)
            time.sleep(0.05)

        def converged() -> bool:
            a.pub.publish_buffer(a.events)  # the loop calls these every iteration, idle or not
            b.pub.publish_buffer(b.events)
            return f.redis_ok and f.index.state() == {a.wid: a.truth(), b.wid: b.truth()}

        assert wait_for(converged, 15), (f.index.workers(), a.pub.redis_ok, b.pub.redis_ok)
        assert a.pub.resyncs >= 2 and b.pub.resyncs >= 2  # b was idle: its heartbeat saw the loss
        assert f.full_loads >= 2
        a.check_matches(f)
        b.check_matches(f)
    finally:
        f.close()
        a.pub.close()
        b.pub.close()


class FlakyLink:
    """A TCP proxy in front of Redis that the test can cut (connections dropped, new ones closed
    at once) and restore: a network blip, while Redis itself keeps its data."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self.listener.getsockname()[1]}/0"
        self.up = True
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.up = False
        for s in self.conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.conns.clear()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_network_blip_is_retried_without_resync(redis_server):
    """Redis keeps its data but connections die: queued batches are written after checking what
    landed (meta's seq), with no whole-state resync, and the follower converges."""
    link = FlakyLink(redis_server.port)
    a = SimWorker(link.url, "w-blip", 9)
    f = KVIndexFollower(link.url, PS, W, block_ms=100).start()
    try:
        a.step(5)
        settle(f, a)
        resyncs = a.pub.resyncs
        for _ in range(3):
            link.cut()
            a.step(5)  # queued while the link is down
            assert wait_for(lambda: not a.pub.redis_ok and not f.redis_ok, 5)
            link.up = True
            a.step(2)
            settle(f, a)
            assert f.index.state() == {a.wid: a.truth()}
        assert a.pub.redis_errors >= 3 and f.redis_errors >= 3
        assert a.pub.resyncs == resyncs and a.pub.resyncs_requested == 0
        a.check_matches(f)
    finally:
        f.close()
        a.pub.close()
        link.close()


# ---- workers leaving ---------------------------------------------------------------------------


def test_clean_close_and_forget_worker(redis_server):
    a, b = SimWorker(redis_server.url, "w-close", 7), SimWorker(redis_server.url, "w-forget", 8)
    f = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
    r = make_client(redis_server.url)
    try:
        a.step(5)
        b.step(5)
        settle(f, a, b)
        assert f.index.workers() == {a.wid, b.wid}
        a.pub.close()
        assert wait_for(lambda: f.index.workers() == {b.wid}, 5)
        assert not any(a.wid in k.decode() for k in r.keys("swaserve:kv:*"))
        f.forget_worker(b.wid)  # b left the registry
        assert f.index.workers() == set()
        # b is alive after all and beats: it comes back whole
        assert wait_for(lambda: f.index.blocks(b.wid) == b.truth() and b.truth()[0], 5)
    finally:
        f.close()
        b.pub.close()
        r.close()


_CRASHER = """
import sys, time
from services.common.kv_event_bus import KVEventPublisher
from services.common.block_hash import BlockHash
pub = KVEventPublisher(sys.argv[1], "w-crash", 4, 8, ttl=1.0, heartbeat_s=0.2,
                       snapshot_fn=lambda: ([BlockHash(1), BlockHash(2)], [BlockHash(1), BlockHash(2)]))
pub.publish([])
assert pub.flush(10)
print("published", flush=True)
time.sleep(60)
"""


def test_a_crashed_workers_blocks_expire(redis_server):
    root = Path(__file__).resolve().parents[2]
    f = KVIndexFollower(redis_server.url, PS, W, block_ms=100, sweep_s=0.2).start()
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHER, redis_server.url], cwd=root, stdout=subprocess.PIPE
    )
    r = make_client(redis_server.url)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"published"
        assert wait_for(
            lambda: f.index.match([BlockHash(1), BlockHash(2)]) == {"w-crash": WorkerMatch(2, 2)}, 5
        )
        proc.kill()  # no close(): its keys live until the TTL (1 s) runs out
        proc.wait()
        assert wait_for(lambda: f.index.workers() == set(), 5)
        assert r.smembers(KVKeys().sources) == set()  # pruned
        late = KVIndexFollower(redis_server.url, PS, W, block_ms=100).start()
        assert late.ready and late.index.workers() == set()
        late.close()
    finally:
        proc.kill()
        f.close()
        r.close()


# ---- a real prefill worker ---------------------------------------------------------------------


def test_a_prefill_worker_publishes_its_radix_cache(redis_server):
    from services.common.sampling_params import SamplingParams
    from services.models.model_store import resolve_model
    from services.prefill.worker import PrefillJob
    from services.worker.serve import attach_kv_events
    from tests.worker_harness import LoadedModel, serve_prefill

    lm = LoadedModel.load("mimo-tiny", resolve_model("mimo-tiny"))
    # small pools: prompts of 300 tokens evict full pages and SWA tails
    pre = serve_prefill(lm, engine={"chunk_size": 64, "max_total_tokens": 640, "swa_pages": 24})
    engine = pre.loop.engine
    assert (engine.cfg.page_size, engine.window) == (16, 128)
    pub = attach_kv_events(pre.loop, redis_server.url, worker_id=pre.addr, heartbeat_s=0.2)
    f = KVIndexFollower(redis_server.url, 16, 128, block_ms=100).start()
    rng = random.Random(11)
    system = [rng.randrange(1, 150_000) for _ in range(200)]
    prompts = [system] + [
        system + [rng.randrange(1, 150_000) for _ in range(rng.randrange(20, 120))] for _ in range(5)
    ]
    prompts += [prompts[1][:250] + [7] * 40]  # full KV to 240, SWA only at the system prompt's end (192)

    def cache_view(e, qs=prompts):
        return e.cache.block_hashes(), [(m.raw_len, m.safe_len) for m in map(e.cache.match, qs)]

    seen: list[tuple[int, int]] = []
    ever: set[BlockHash] = set()
    try:
        for i, prompt in enumerate(prompts + prompts[:2]):
            job = PrefillJob(f"r{i}", prompt, SamplingParams(max_tokens=1, temperature=0.0), decode_addr="-")
            pre.worker.prefill(job)
            # a call runs between two steps: every event before it was handed over in an after_step
            (full, swa), lens = pre.loop.call(cache_view).result(10)
            assert pub.flush(5) and f.sync(5)
            assert f.index.state() == {pre.addr: (frozenset(full), frozenset(swa))}
            ever |= set(full)
            got = f.index.match
            assert [
                (m.raw_blocks * 16, m.safe_blocks * 16)
                for m in (got(hash_blocks(q, 16), [pre.addr])[pre.addr] for q in prompts)
            ] == lens
            seen += lens
        assert any(raw > safe > 0 for raw, safe in seen), seen  # partial window-safe hits were seen
        assert len(ever) > len(full) and pub.batches_written > 2  # evictions were mirrored too
    finally:
        f.close()
        pub.close()
        pre.stop()


def test_a_prefill_worker_process_publishes_under_its_registry_id_and_clears_on_exit(redis_server):
    """`python -m services.prefill.main --redis-url`: blocks appear under the registry's worker_id,
    and SIGTERM (deregister, then close) removes them from Redis and from followers."""
    import signal

    import grpc

    from services.common.prompt_wire import pack_ids
    from services.common.registry import WorkerRegistry
    from services.common.sampling_wire import sampling_to_proto
    from services.proto_gen import worker_pb2, worker_pb2_grpc

    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "services.prefill.main", "--model", "mimo-tiny", "--port", "0",
           "--redis-url", redis_server.url, "--torch-threads", "1", "--log-level", "WARNING"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=root, stderr=subprocess.PIPE, text=True)
    f = KVIndexFollower(redis_server.url, 16, 128, block_ms=100).start()
    registry = WorkerRegistry(redis_server.url)
    try:
        assert proc.stderr is not None
        addr = next(line.split("ready on ")[1].split()[0] for line in proc.stderr if "ready on" in line)
        (record,) = registry.list("prefill")
        assert record.addr == addr and record.worker_id != addr
        assert wait_for(lambda: f.index.workers() == {record.worker_id}, 10)
        prompt = list(range(1, 300))
        with grpc.insecure_channel(addr) as ch:
            worker_pb2_grpc.PrefillWorkerStub(ch).Prefill(
                worker_pb2.PrefillRequest(
                    rid="p", prompt_ids_packed=pack_ids(prompt), decode_addr="-",
                    sampling=sampling_to_proto({"temperature": 0.0, "max_tokens": 1}),
                ),
                timeout=60,
            )  # fmt: skip
        full = WorkerMatch(len(prompt) // 16, len(prompt) // 16)  # the prompt end keeps its SWA tail
        assert wait_for(lambda: f.index.match(hash_blocks(prompt, 16)) == {record.worker_id: full}, 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert wait_for(lambda: f.index.workers() == set(), 5)
        assert registry.redis.smembers(KVKeys().sources) == set()
    finally:
        proc.kill()
        f.close()
        registry.close()
