"""Which GCache nodes are live: registry records (role "gcache") -> a hash ring, refreshed in the
background, plus short "down" marks for nodes that just failed a call.

A node registers `WorkerRecord(role="gcache", worker_id=<node id>, addr, labels={"host_id", "data_addr", ...})`
with a TTL heartbeat (services/common/registry.py). Every client and every draining node builds
the same ring from the same node ids (services/common/hash_ring.py), so all agree on owners
without talking to each other. A node that dies drops out of the ring when its record expires
(one TTL); until then a failed call marks it down for `down_seconds`, so callers skip it rather
than wait on it again. A Redis that cannot be reached leaves the last ring in place.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from services.common.hash_ring import DEFAULT_VNODES, HashRing
from services.common.registry import DEFAULT_PREFIX, WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)

ROLE = "gcache"


def default_host_id() -> str:
    """What a node and a client on the same machine both report: $SWASERVE_HOST_ID or the hostname."""
    return os.environ.get("SWASERVE_HOST_ID") or socket.gethostname()


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    addr: str
    host_id: str
    metrics_addr: str = ""
    data_addr: str = ""  # host:port of its data plane (data_plane.py); "" = values over gRPC

    @classmethod
    def from_record(cls, rec: WorkerRecord) -> NodeInfo:
        labels = rec.labels
        return cls(
            rec.worker_id, rec.addr, labels.get("host_id", ""), rec.metrics_addr, labels.get("data_addr", "")
        )


class NodeDirectory:
    def __init__(self, redis_url: str, prefix: str = DEFAULT_PREFIX, refresh_interval: float = 1.0,
                 vnodes: int = DEFAULT_VNODES, down_seconds: float = 2.0,
                 on_change: Callable[[dict[str, NodeInfo]], None] | None = None) -> None:  # fmt: skip
        self.registry = WorkerRegistry(redis_url, prefix=prefix)
        self.refresh_interval = refresh_interval
        self.vnodes = vnodes
        self.down_seconds = down_seconds
        self.on_change = on_change
        self.nodes: dict[str, NodeInfo] = {}
        self.ring = HashRing([], vnodes)
        self.refreshes = 0
        self.redis_ok = True
        self._down: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> bool:
        """Read the live nodes now; True if the set changed. Never raises on Redis errors."""
        try:
            records = self.registry.list(ROLE)
        except redis.RedisError as e:
            if self.redis_ok:
                log.warning("gcache discovery: Redis unreachable (%s); keeping %d nodes", e, len(self.nodes))
            self.redis_ok = False
            return False
        self.redis_ok = True
        nodes = {r.worker_id: NodeInfo.from_record(r) for r in records}
        with self._lock:
            self.refreshes += 1
            if nodes == self.nodes:
                return False
            self.nodes = nodes
            self.ring = HashRing(nodes, self.vnodes)
        log.info("gcache discovery: %d node(s): %s", len(nodes), ", ".join(sorted(nodes)))
        if self.on_change is not None:
            self.on_change(nodes)
        return True

    def start(self) -> NodeDirectory:
        self.refresh()
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="gcache-discovery", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - discovery never dies
                log.exception("gcache discovery: refresh failed")

    def snapshot(self) -> tuple[HashRing, dict[str, NodeInfo]]:
        with self._lock:
            return self.ring, self.nodes

    # -- down marks ------------------------------------------------------------------------------
    def mark_down(self, node_id: str) -> None:
        with self._lock:
            self._down[node_id] = time.monotonic() + self.down_seconds

    def is_down(self, node_id: str) -> bool:
        until = self._down.get(node_id)
        if until is None:
            return False
        if until <= time.monotonic():
            with self._lock:
                self._down.pop(node_id, None)
            return False
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.refresh_interval + 3)
            self._thread = None
        self.registry.redis.close()
