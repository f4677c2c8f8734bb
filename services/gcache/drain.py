"""Proactive migration: a node leaving on purpose hands its blocks to their owners on the ring
without it, so its keys stay hits.

For each block, hot ones first, the targets are its `replication` owners on `ring.without(self)`.
Blocks go in batches of about `batch_bytes`; each target is first asked which of its blocks it
already holds (BatchExists), and only the rest are sent as a put with `migration=True`, which the
receiver counts (over the target's data plane when it has one, data_conn.py; else BatchPut). A
target that fails is skipped for the rest of the pass (its blocks are counted as failed), so a
dead peer holds the shutdown up for one failed call only: a gRPC call waits up to `timeout`; on
the data plane each stalled send or receive waits up to `timeout`, and the connect has its own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from services.common.hash_ring import HashRing
from services.gcache.conn import NodeConn, NodeError
from services.gcache.data_conn import DataConn
from services.gcache.discovery import NodeInfo
from services.gcache.store import BlockStore

log = logging.getLogger(__name__)


@dataclass
class DrainReport:
    blocks_sent: int = 0
    bytes_sent: int = 0
    blocks_present: int = 0  # the target had it already
    blocks_failed: int = 0  # target failed or refused, or the block could not be read
    seconds: float = 0.0

    def add(self, other: DrainReport) -> None:
        self.blocks_sent += other.blocks_sent
        self.bytes_sent += other.bytes_sent
        self.blocks_present += other.blocks_present
        self.blocks_failed += other.blocks_failed
        self.seconds += other.seconds


class Migrator:
    def __init__(self, store: BlockStore, node_id: str, replication: int = 1, batch_bytes: int = 32 << 20,
                 timeout: float = 30.0) -> None:  # fmt: skip
        self.store = store
        self.node_id = node_id
        self.replication = replication
        self.batch_bytes = batch_bytes
        self.timeout = timeout

    def migrate(self, keys: Iterable[bytes], ring: HashRing, nodes: dict[str, NodeInfo]) -> DrainReport:
        """Hand `keys` (those still held) to their owners on `ring` (which must not contain us)."""
        t0 = time.monotonic()
        report = DrainReport()
        if self.node_id in ring:
            ring = ring.without(self.node_id)
        if not len(ring):
            log.info("gcache drain: no other node to hand blocks to")
            return report
        conns = {n: NodeConn(nodes[n].addr, self.timeout) for n in ring.nodes if n in nodes}
        data = {n: DataConn(nodes[n].data_addr, self.timeout) for n in conns if nodes[n].data_addr}
        dead: set[str] = set()
        try:
            batch: list[tuple[bytes, memoryview]] = []
            size = 0
            for key in keys:
                found = self.store.peek(key)
                if found is None:
                    continue
                batch.append((key, found.value))
                size += len(found.value)
                if size >= self.batch_bytes:
                    self._send(batch, ring, conns, data, dead, report)
                    batch, size = [], 0
            if batch:
                self._send(batch, ring, conns, data, dead, report)
        finally:
            for c in conns.values():
                c.close()
            for d in data.values():
                d.close()
        report.seconds = time.monotonic() - t0
        self.store.count_migration("sent", report.blocks_sent, report.bytes_sent)
        return report

    def _send(self, batch: list[tuple[bytes, memoryview]], ring: HashRing, conns: dict[str, NodeConn],
              data: dict[str, DataConn], dead: set[str], report: DrainReport) -> None:  # fmt: skip
        by_node: dict[str, list[int]] = {}
        for i, (key, _) in enumerate(batch):
            for n in ring.owners(int.from_bytes(key[:8], "big"), self.replication):
                by_node.setdefault(n, []).append(i)
        for node_id, idx in by_node.items():
            conn = conns.get(node_id)
            if conn is None or node_id in dead:
                report.blocks_failed += len(idx)
                continue
            try:
                present = conn.exists([batch[i][0] for i in idx])
                todo = [i for i, p in zip(idx, present, strict=True) if not p]
                report.blocks_present += len(idx) - len(todo)
                if not todo:
                    continue
                via = data.get(node_id, conn)
                result = via.put([batch[i] for i in todo], migration=True, sender=self.node_id)
            except NodeError as e:
                log.warning("gcache drain: %s failed, skipping it: %s", node_id, e)
                dead.add(node_id)
                report.blocks_failed += len(idx)
                continue
            for i, st in zip(todo, result.statuses, strict=True):
                if st.ok:
                    report.blocks_sent += 1
                    report.bytes_sent += len(batch[i][1])
                else:
                    report.blocks_failed += 1
