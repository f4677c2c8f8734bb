"""One GCache node: store + gRPC service + data plane + /metrics + registry record, and its orderly exit.

    start   store (indexes the disk tier) -> gRPC server, data plane (TCP) -> /metrics -> register in Redis
    drain   (SIGTERM) draining = True, record puts from now on
            1. hand every block to its owners on the ring without us (drain.py), hot first
            2. deregister: clients drop us at their next refresh (<= refresh interval)
            3. keep serving for `drain_grace` (clients that have not refreshed yet still come here),
               then hand over what was put since step 1 (repeated while new puts keep arriving)
            4. stop the server
A node killed with -9 does none of this: its record expires after one TTL, clients see misses
for its keys meanwhile (and mark it down after the first failed call).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from services.common.grpc_server import make_server
from services.common.hash_ring import DEFAULT_VNODES
from services.common.registry import DEFAULT_PREFIX, WorkerRecord, WorkerRegistry
from services.gcache.arena import ArenaMap
from services.gcache.data_plane import DataPlaneServer
from services.gcache.discovery import ROLE, NodeDirectory
from services.gcache.drain import DrainReport, Migrator
from services.gcache.metrics import node_registry, serve_metrics
from services.gcache.servicer import GCacheService
from services.gcache.store import BlockStore, StoreConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    store: StoreConfig
    host: str = "0.0.0.0"
    port: int = 0
    advertise_host: str = "127.0.0.1"
    redis_url: str = ""
    metrics_port: int = -1  # -1: off, 0: any free port
    heartbeat_ttl: float = 6.0
    replication: int = 1  # must match the clients': the drain hands blocks to this many owners
    node_id: str = ""  # default gcache-<advertise_host>-<port>: stable across restarts
    host_id: str = ""
    data_port: int = 0  # the data plane's TCP port (0: any free port, -1: off, values over gRPC)
    drain_grace: float = 2.0  # > the clients' refresh interval
    vnodes: int = DEFAULT_VNODES
    registry_prefix: str = DEFAULT_PREFIX


class GCacheNode:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.store = BlockStore(config.store)
        self.draining = False
        self.server, self.port = make_server(config.host, config.port)
        self.addr = f"{config.advertise_host}:{self.port}"
        self.node_id = config.node_id or f"gcache-{config.advertise_host}-{self.port}"
        self.arenas = ArenaMap()
        self.service = GCacheService(
            self.store, self.node_id, self.addr, self.arenas, lambda: self.draining, self._data_counters
        )
        self.server.add_generic_rpc_handlers((self.service.handler(),))
        self.data_plane: DataPlaneServer | None = None
        self.data_addr = ""
        if config.data_port >= 0:
            self.data_plane = DataPlaneServer(self.store, config.host, config.data_port)
            self.data_addr = f"{config.advertise_host}:{self.data_plane.port}"
        self.metrics_port = 0
        self.registry: WorkerRegistry | None = None
        self.drain_report = DrainReport()
        self._stopped = threading.Event()

    def start(self) -> GCacheNode:
        self.server.start()
        if self.data_plane is not None:
            self.data_plane.start()
        cfg = self.config
        metrics_addr = ""
        if cfg.metrics_port >= 0:
            reg = node_registry(self.store, self._extra_metrics)
            self.metrics_port = serve_metrics(reg, cfg.metrics_port, cfg.host)
            metrics_addr = f"{cfg.advertise_host}:{self.metrics_port}"
        if cfg.redis_url:
            self.registry = WorkerRegistry(cfg.redis_url, prefix=cfg.registry_prefix, ttl=cfg.heartbeat_ttl)
            u = self.store.usage()
            self.registry.register(
                WorkerRecord(
                    role=ROLE, addr=self.addr, model="*", capacity_tokens=0, metrics_addr=metrics_addr,
                    worker_id=self.node_id,
                    labels={"host_id": cfg.host_id, "memory_bytes": str(u.memory_capacity),
                            "disk_bytes": str(u.disk_capacity), "data_addr": self.data_addr},
                )
            )  # fmt: skip
        u = self.store.usage()
        log.info(
            "gcache node %s serving on %s, data plane %s (memory %d B, disk %d B in %s, %d blocks found on disk)%s",
            self.node_id, self.addr, self.data_addr or "off", u.memory_capacity, u.disk_capacity, cfg.store.disk_dir, u.disk_blocks,
            f", metrics http://{metrics_addr}/metrics" if metrics_addr else "",
        )  # fmt: skip
        return self

    def _data_counters(self) -> dict[str, int]:
        d = self.data_plane
        return {
            "data_bytes_in": d.bytes_in if d else 0,
            "data_bytes_out": d.bytes_out if d else 0,
            "data_rejected_frames": d.rejected_frames if d else 0,
            "data_connections": d.connections if d else 0,
        }

    def _extra_metrics(self) -> dict[str, int]:
        s = self.service
        return {
            "shm_bytes_in": s.shm_bytes_in,
            "shm_bytes_out": s.shm_bytes_out,
            "draining": int(self.draining),
            **self._data_counters(),
        }

    def drain(self) -> DrainReport:
        """Hand every block over, deregister, hand over late puts (see the module doc)."""
        cfg = self.config
        self.draining = True
        self.store.track_puts()
        if not cfg.redis_url:
            return self.drain_report
        directory = NodeDirectory(cfg.redis_url, cfg.registry_prefix, vnodes=cfg.vnodes)
        migrator = Migrator(self.store, self.node_id, cfg.replication)
        try:
            directory.refresh()
            ring, nodes = directory.snapshot()
            if self.registry is not None and not len(ring.without(self.node_id)):
                log.info("gcache drain: no other node to hand blocks to; leaving them on disk, if any")
                self.registry.deregister()
                return self.drain_report
            self.drain_report.add(migrator.migrate(self.store.keys_hot_first(), ring, nodes))
            log.info("gcache drain: first pass %s", self.drain_report)
            if self.registry is not None:
                self.registry.deregister()
            deadline = time.monotonic() + cfg.drain_grace
            while True:
                time.sleep(max(0.0, min(0.5, deadline - time.monotonic())))
                late = self.store.track_puts()
                if late:
                    directory.refresh()
                    ring, nodes = directory.snapshot()
                    self.drain_report.add(migrator.migrate(late, ring, nodes))
                if time.monotonic() >= deadline:
                    break  # puts after this last pass are lost: clients stopped sending by now
        finally:
            directory.close()
        log.info("gcache drain done: %s", self.drain_report)
        return self.drain_report

    def stop(self, grace: float = 1.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.registry is not None:
            self.registry.close()
        self.server.stop(grace).wait()
        if self.data_plane is not None:
            self.data_plane.close()
        self.arenas.close()

    def wait(self) -> None:
        self._stopped.wait()
