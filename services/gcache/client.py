"""GCacheClient: the one module other services import to use the L3 cache.

    client = GCacheClient(redis_url, replication=1)
    report = client.put_many([(key, value), ...])     # PutReport: stored, dropped, errors per key
    got = client.get_many(keys)                       # {key: memoryview}; misses are absent
    n = client.exists_prefix(chained_keys)            # leading keys present on the cluster
    flags = client.exists_each(keys)                  # per key: present on a live owner
    client.delete(keys); client.stats(); client.close()

Keys are BlockKey, 16 raw bytes, or 128-bit block hashes (keys.py); results are keyed by the
objects passed in. Placement: each key lives on the first `replication` nodes clockwise from it on
the ring of live nodes (discovery.py); the client talks to those nodes directly, in parallel.

Failures never raise from get_many / exists_prefix / put_many / delete: an unreachable node is
marked down for a moment and its keys are misses (get), absent (exists) or dropped (put, counted in
`counters.puts_dropped`); with replication > 1 a get asks the next replica. A value a node refuses
(too large, disk failed) is in `PutReport.errors` with the node's reason; the rest of the batch is
unaffected. Values read are read-only memoryviews (bytes-like; `bytes(v)` copies).

Paths for values: same host, when a node registered the client's host id (and /dev/shm works),
through the client's shared-memory arena (arena.py; `shm=False` turns that off); otherwise over
the node's data plane, a plain TCP connection beside gRPC (data_conn.py; `data_plane=False`, or a
node without one: as data frames in the gRPC streams). `counters` shows which path carried what.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Protocol, TypeVar

from services.common.hash_ring import DEFAULT_VNODES
from services.common.registry import DEFAULT_PREFIX
from services.gcache.arena import ClientArena, Slot, align
from services.gcache.conn import NodeConn, NodeError, PutResult
from services.gcache.data_conn import DataConn
from services.gcache.discovery import NodeDirectory, NodeInfo, default_host_id
from services.gcache.keys import BlockKey, KeyLike, as_key
from services.gcache.results import PutOutcome
from services.gcache.wire import Buffer
from services.proto_gen import gcache_pb2

log = logging.getLogger(__name__)


class _Moved(Protocol):
    @property
    def shm_bytes(self) -> int: ...
    @property
    def grpc_bytes(self) -> int: ...
    @property
    def data_bytes(self) -> int: ...


R = TypeVar("R", bound=_Moved)


class _Conn(Protocol):
    @property
    def addr(self) -> str: ...
    def close(self) -> None: ...


C = TypeVar("C", bound=_Conn)


@dataclass
class ClientCounters:
    puts_stored: int = 0  # keys stored on at least one replica
    puts_rejected: int = 0  # keys a node refused (PutReport.errors)
    puts_dropped: int = 0  # replica copies not sent or lost: node down or the call failed
    gets_hit: int = 0
    gets_missed: int = 0
    node_errors: int = 0  # failed calls
    shm_calls: int = 0  # puts and gets that used the arena
    grpc_calls: int = 0
    data_calls: int = 0  # puts and gets over the nodes' data plane (TCP, data_conn.py)
    shm_bytes: int = 0  # value bytes through the arena, both directions
    grpc_bytes: int = 0  # value bytes as data frames, both directions
    data_bytes: int = 0  # value bytes over the data plane, both directions
    shm_refusals: int = 0  # a node could not map our arena: that node gets gRPC from then on


@dataclass(frozen=True)
class PutReport:
    stored: int  # keys stored on at least one replica
    dropped: int  # keys stored nowhere because their nodes were down or failed
    errors: dict[KeyLike, str] = field(default_factory=dict)  # keys a node refused, and why

    @property
    def ok(self) -> bool:
        return not self.dropped and not self.errors


class GCacheClient:
    def __init__(self, redis_url: str, replication: int = 1, *, shm: bool = True, shm_bytes: int = 256 << 20,
                 shm_slots: int = 4, host_id: str | None = None, timeout: float = 10.0,
                 refresh_interval: float = 1.0, down_seconds: float = 2.0, vnodes: int = DEFAULT_VNODES,
                 registry_prefix: str = DEFAULT_PREFIX, max_workers: int = 8,
                 data_plane: bool = True) -> None:  # fmt: skip
        if replication < 1:
            raise ValueError("replication must be >= 1")
        self.replication = replication
        self.timeout = timeout
        self.host_id = host_id or default_host_id()
        self.client_id = f"client-{socket.gethostname()}-{os.getpid()}"
        self.counters = ClientCounters()
        self._count_lock = threading.Lock()
        self._conns: dict[str, NodeConn] = {}
        self.data_plane = data_plane
        self._data_conns: dict[str, DataConn] = {}
        self._conn_lock = threading.Lock()
        self._no_shm: set[str] = set()
        self.arena: ClientArena | None = None
        if shm:
            try:
                self.arena = ClientArena(shm_bytes, shm_slots)
            except OSError as e:
                log.warning("gcache client: /dev/shm unusable (%s); same-host nodes get gRPC", e)
        self.slot_bytes = self.arena.slot_bytes if self.arena is not None else 0
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="gcache-client")
        self.directory = NodeDirectory(
            redis_url, registry_prefix, refresh_interval, vnodes, down_seconds, on_change=self._nodes_changed
        ).start()

    # -- placement -------------------------------------------------------------------------------
    def owners(self, key: KeyLike) -> list[str]:
        """The node ids that own a key (first = primary), live or not."""
        ring, _ = self.directory.snapshot()
        return ring.owners(as_key(key).ring_point, self.replication)

    def _placement(self, keys: Sequence[BlockKey]) -> tuple[list[list[str]], dict[str, NodeInfo], int]:
        """Per key its owners not marked down, the nodes, and how many owner slots were skipped
        (a down owner, or fewer nodes than `replication`)."""
        ring, nodes = self.directory.snapshot()
        down = self.directory.is_down
        owners, skipped = [], 0
        for k in keys:
            own = [n for n in ring.owners(k.ring_point, self.replication) if not down(n)]
            skipped += self.replication - len(own)
            owners.append(own)
        return owners, nodes, skipped

    def nodes(self) -> dict[str, NodeInfo]:
        return self.directory.snapshot()[1]

    def wait_for_nodes(self, count: int, timeout: float = 10.0) -> bool:
        """Refresh until at least `count` nodes are live (tests, benches, startup)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.directory.refresh()
            if len(self.nodes()) >= count:
                return True
            time.sleep(0.05)
        return False

    # -- put -------------------------------------------------------------------------------------
    def put_many(self, items: Mapping[KeyLike, Buffer] | Iterable[tuple[KeyLike, Buffer]]) -> PutReport:
        """Store values on their owners; never raises for node failures (see the module doc)."""
        pairs = [(k, _as_bytes(v)) for k, v in (items.items() if isinstance(items, Mapping) else items)]
        keys = [as_key(k) for k, _ in pairs]
        owners, nodes, skipped = self._placement(keys)
        stored = [False] * len(pairs)
        errors: dict[KeyLike, str] = {}
        failed_copies = [0]

        def run(node_id: str, idx: list[int]) -> None:
            try:
                statuses = self._put_node(nodes[node_id], [(keys[i], pairs[i][1]) for i in idx])
            except NodeError as e:
                self._failed(node_id, e)
                with self._count_lock:
                    failed_copies[0] += len(idx)
                return
            for i, st in zip(idx, statuses, strict=True):
                if st.ok:
                    stored[i] = True
                else:
                    errors[pairs[i][0]] = f"{st.code.name}: {st.error}"

        self._fan_out(run, _group(owners))
        dropped = sum(1 for i, ok in enumerate(stored) if not ok and pairs[i][0] not in errors)
        with self._count_lock:
            c = self.counters
            c.puts_stored += sum(stored)
            c.puts_rejected += len(errors)
            c.puts_dropped += skipped + failed_copies[0]
        return PutReport(sum(stored), dropped, errors)

    def _put_node(self, node: NodeInfo, items: list[tuple[BlockKey, Buffer]]) -> list[PutOutcome]:
        conn = self._conn(node)
        out: list[PutOutcome] = []
        for batch in _slot_batches(items, self.slot_bytes) if self._shm_ok(node) else [items]:

            def put(slot: Slot | None, b: list[tuple[BlockKey, Buffer]] = batch) -> PutResult:
                return conn.put(b, self.arena, slot, sender=self.client_id)

            def put_data(data: DataConn, b: list[tuple[BlockKey, Buffer]] = batch) -> PutResult:
                return data.put(b, sender=self.client_id)

            out += self._call(node, put, put_data).statuses
        return out

    # -- get -------------------------------------------------------------------------------------
    def get_many(self, keys: Iterable[KeyLike]) -> dict[KeyLike, memoryview]:
        """Values of the keys found (read-only memoryviews); misses are absent. Never raises for
        node failures: a key whose owners are down or fail is a miss."""
        orig = list(dict.fromkeys(keys))
        ks = [as_key(k) for k in orig]
        owners, nodes, _ = self._placement(ks)
        found: dict[int, memoryview] = {}
        lock = threading.Lock()

        def run(node_id: str, idx: list[int]) -> None:
            node, want = nodes[node_id], [ks[i] for i in idx]
            try:
                conn = self._conn(node)
                res = self._call(node, lambda slot: conn.get(want, self.arena, slot), lambda d: d.get(want))
            except NodeError as e:
                self._failed(node_id, e)
                return
            with lock:
                for j, v in res.values.items():
                    found[idx[j]] = v

        for rnd in range(self.replication):  # round r asks each key's r-th live owner, if still missing
            todo = [[own[rnd]] if i not in found and rnd < len(own) else [] for i, own in enumerate(owners)]
            by_node = _group(todo)
            if not by_node:
                break
            self._fan_out(run, by_node)
        with self._count_lock:
            self.counters.gets_hit += len(found)
            self.counters.gets_missed += len(ks) - len(found)
        return {orig[i]: v for i, v in found.items()}

    # -- exists, delete, stats -------------------------------------------------------------------
    def exists_prefix(self, keys: Sequence[KeyLike]) -> int:
        """How many leading keys are present: the first index no live owner reports present."""
        present = self.exists_each(keys)
        return next((i for i, p in enumerate(present) if not p), len(present))

    def exists_each(self, keys: Sequence[KeyLike]) -> list[bool]:
        """Per key, whether a live owner reports it present (one call per node, in parallel)."""
        ks = [as_key(k) for k in keys]
        owners, nodes, _ = self._placement(ks)
        present = [False] * len(ks)

        def run(node_id: str, idx: list[int]) -> None:
            try:
                answers = self._conn(nodes[node_id]).exists([ks[i] for i in idx])
            except NodeError as e:
                self._failed(node_id, e)
                return
            for i, p in zip(idx, answers, strict=True):
                if p:
                    present[i] = True

        self._fan_out(run, _group(owners))
        return present

    def delete(self, keys: Iterable[KeyLike]) -> int:
        """Delete keys from every owner; returns the number of copies deleted (best effort)."""
        ks = [as_key(k) for k in keys]
        owners, nodes, _ = self._placement(ks)
        deleted = [0]

        def run(node_id: str, idx: list[int]) -> None:
            try:
                n = self._conn(nodes[node_id]).delete([ks[i] for i in idx])
            except NodeError as e:
                self._failed(node_id, e)
                return
            with self._count_lock:
                deleted[0] += n

        self._fan_out(run, _group(owners))
        return deleted[0]

    def stats(self) -> dict[str, gcache_pb2.StatsReply | str]:
        """Each live node's StatsReply by node id (or the error text if it did not answer)."""
        nodes = self.nodes()
        out: dict[str, gcache_pb2.StatsReply | str] = {}

        def run(node_id: str, _: list[int]) -> None:
            try:
                out[node_id] = self._conn(nodes[node_id]).stats()
            except NodeError as e:
                out[node_id] = str(e)

        self._fan_out(run, {n: [] for n in nodes})
        return out

    def counters_dict(self) -> dict[str, int]:
        with self._count_lock:
            return asdict(self.counters)

    # -- plumbing --------------------------------------------------------------------------------
    def _fan_out(self, fn: Callable[[str, list[int]], None], by_node: dict[str, list[int]]) -> None:
        if len(by_node) == 1:
            ((n, idx),) = by_node.items()
            fn(n, idx)
            return
        for f in [self._pool.submit(fn, n, idx) for n, idx in by_node.items()]:
            f.result()

    def _conn(self, node: NodeInfo) -> NodeConn:
        return self._cached(self._conns, node.node_id, node.addr, NodeConn)

    def _data_conn(self, node: NodeInfo) -> DataConn:
        return self._cached(self._data_conns, node.node_id, node.data_addr, DataConn)

    def _cached(self, table: dict[str, C], node_id: str, addr: str, factory: Callable[[str, float], C]) -> C:
        """The node's connection in `table`, made anew (the old one closed) if missing or its address changed."""
        with self._conn_lock:
            conn = table.get(node_id)
            if conn is None or conn.addr != addr:
                if conn is not None:
                    conn.close()
                conn = table[node_id] = factory(addr, self.timeout)
            return conn

    def _nodes_changed(self, nodes: dict[str, NodeInfo]) -> None:
        with self._conn_lock:
            for table in (self._conns, self._data_conns):
                for node_id in [n for n in table if n not in nodes]:
                    table.pop(node_id).close()
            self._no_shm &= set(nodes)

    def _shm_ok(self, node: NodeInfo) -> bool:
        return self.arena is not None and node.host_id == self.host_id and node.node_id not in self._no_shm

    def _data_ok(self, node: NodeInfo) -> bool:
        return self.data_plane and bool(node.data_addr)

    def _call(
        self, node: NodeInfo, call: Callable[[Slot | None], R], data_call: Callable[[DataConn], R]
    ) -> R:
        """Run `call(slot)` with an arena slot when the node shares our host; else (or with every
        slot busy) `data_call` over the node's data plane, or `call(None)`: plain gRPC. A node that
        cannot map the arena gets the data plane or gRPC from then on."""
        slot = self.arena.acquire() if self.arena is not None and self._shm_ok(node) else None
        if slot is None:
            if self._data_ok(node):
                return self._count(data_call(self._data_conn(node)), "data")
            return self._count(call(None), "grpc")
        assert self.arena is not None
        try:
            result = call(slot)
        except NodeError as e:
            self.arena.release(slot, failed=True)
            if not e.shm_refused:
                raise
            log.warning("gcache client: node %s cannot use our arena (%s); not using it", node.node_id, e)
            self._no_shm.add(node.node_id)
            with self._count_lock:
                self.counters.shm_refusals += 1
            return self._call(node, call, data_call)
        self.arena.release(slot)
        return self._count(result, "shm")

    def _count(self, result: R, path: str) -> R:
        with self._count_lock:
            c = self.counters
            if path == "shm":
                c.shm_calls += 1
            elif path == "grpc":
                c.grpc_calls += 1
            else:
                c.data_calls += 1
            c.shm_bytes += result.shm_bytes
            c.grpc_bytes += result.grpc_bytes
            c.data_bytes += result.data_bytes
        return result

    def _failed(self, node_id: str, e: NodeError) -> None:
        with self._count_lock:
            self.counters.node_errors += 1
        if e.unreachable:
            self.directory.mark_down(node_id)
        log.warning("gcache client: %s", e)

    def close(self) -> None:
        self.directory.close()
        self._pool.shutdown(wait=True)
        with self._conn_lock:
            for table in (self._conns, self._data_conns):
                for conn in table.values():
                    conn.close()
                table.clear()
        if self.arena is not None:
            self.arena.close()

    def __enter__(self) -> GCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _slot_batches(
    items: list[tuple[BlockKey, Buffer]], slot_bytes: int
) -> Iterable[list[tuple[BlockKey, Buffer]]]:
    """Consecutive runs of items that fit one slot together (an item bigger than a slot goes alone)."""
    batch: list[tuple[BlockKey, Buffer]] = []
    used = 0
    for item in items:
        n = align(len(item[1]))
        if batch and used + n > slot_bytes:
            yield batch
            batch, used = [], 0
        batch.append(item)
        used += n
    if batch:
        yield batch


def _as_bytes(value: Buffer) -> Buffer:
    """bytes and bytearray as they are; any other buffer (numpy, torch via .numpy()) as flat bytes."""
    return value if isinstance(value, bytes | bytearray) else memoryview(value).cast("B")


def _group(owners: list[list[str]]) -> dict[str, list[int]]:
    """node id -> indices of the keys it is asked about, in key order."""
    by_node: dict[str, list[int]] = {}
    for i, own in enumerate(owners):
        for n in own:
            by_node.setdefault(n, []).append(i)
    return by_node
