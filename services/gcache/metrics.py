"""The node's Prometheus metrics (`swaserve_gcache_*`), read from the store at scrape time.

The store's counters are the one source (the Stats RPC returns the same numbers), so this is a
collector that turns them into families on every scrape rather than a second set of counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.gcache.store import BlockStore

P = "swaserve_gcache"

# family (without _total), help, label name, {label value: StoreCounters field}
COUNTERS: list[tuple[str, str, str, dict[str, str]]] = [
    ("hits", "lookups found, by the tier that had the block", "tier",
     {"memory": "hits_memory", "disk": "hits_disk"}),
    ("misses", "lookups not found in a tier (memory: went on to disk; disk: a miss)", "tier",
     {"memory": "misses_memory", "disk": "misses_disk"}),
    ("evictions", "blocks evicted from a tier (memory: spilled or dropped; disk: deleted)", "tier",
     {"memory": "evictions_memory", "disk": "evictions_disk"}),
    ("spills", "memory evictions by what happened to the block", "outcome",
     {"written": "spills_written", "skipped": "spills_skipped", "failed": "spills_failed",
      "dropped": "spills_dropped"}),
    ("corrupt_blocks", "disk blocks that failed verification (deleted, served as misses)", "reason",
     {"checksum": "corrupt_checksum", "truncated": "corrupt_truncated", "header": "corrupt_header"}),
    ("rejected_puts", "puts refused, by reason", "reason",
     {"too_large": "rejected_too_large", "disk_failed": "rejected_disk_failed", "invalid": "rejected_invalid"}),
    ("migrated_blocks", "blocks handed over by draining nodes", "direction",
     {"sent": "migrated_blocks_sent", "received": "migrated_blocks_received"}),
    ("migrated_bytes", "value bytes handed over by draining nodes", "direction",
     {"sent": "migrated_bytes_sent", "received": "migrated_bytes_received"}),
]  # fmt: skip
PLAIN_COUNTERS = {
    "puts": ("puts", "values stored"),
    "bytes_in": ("bytes_in", "value bytes stored by puts"),
    "bytes_out": ("bytes_out", "value bytes served by gets"),
    "promotions": ("promotions", "disk hits copied back into memory"),
    "disk_write_errors": ("disk_write_errors", "disk writes that failed (ENOSPC, EFBIG, EIO, ...)"),
    "read_errors": ("disk_read_errors", "disk reads that failed with an OS error"),
    "deleted": ("deleted_blocks", "blocks removed by Delete"),
}


class StoreCollector(Collector):
    def __init__(self, store: BlockStore, extra: Callable[[], dict[str, int]] = dict) -> None:
        self.store = store
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        c = self.store.counters_snapshot()
        for name, doc, label, fields in COUNTERS:
            fam = CounterMetricFamily(f"{P}_{name}", doc, labels=[label])
            for value, field in fields.items():
                fam.add_metric([value], c[field])
            yield fam
        for field, (name, doc) in PLAIN_COUNTERS.items():
            yield CounterMetricFamily(f"{P}_{name}", doc, value=c[field])
        extra = self.extra()
        shm = CounterMetricFamily(
            f"{P}_shm_bytes", "value bytes through clients' shm arenas", labels=["direction"]
        )
        shm.add_metric(["in"], extra.get("shm_bytes_in", 0))
        shm.add_metric(["out"], extra.get("shm_bytes_out", 0))
        yield shm
        data = CounterMetricFamily(
            f"{P}_data_plane_bytes", "value bytes over the data plane (TCP beside gRPC)", labels=["direction"]
        )
        data.add_metric(["in"], extra.get("data_bytes_in", 0))
        data.add_metric(["out"], extra.get("data_bytes_out", 0))
        yield data
        yield CounterMetricFamily(
            f"{P}_data_plane_rejected_frames", "data plane frames refused as malformed (connection closed)",
            value=extra.get("data_rejected_frames", 0),
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{P}_data_plane_connections",
            "open data plane connections",
            value=extra.get("data_connections", 0),
        )
        u = self.store.usage()
        for name, doc, mem, disk in (
            ("used_bytes", "bytes held by a tier", u.memory_used, u.disk_used),
            ("capacity_bytes", "a tier's budget", u.memory_capacity, u.disk_capacity),
            ("blocks", "blocks held by a tier", u.memory_blocks, u.disk_blocks),
        ):
            g = GaugeMetricFamily(f"{P}_{name}", doc, labels=["tier"])
            g.add_metric(["memory"], mem)
            g.add_metric(["disk"], disk)
            yield g
        yield GaugeMetricFamily(
            f"{P}_draining", "1 while the node hands its blocks over", value=extra.get("draining", 0)
        )


def node_registry(store: BlockStore, extra: Callable[[], dict[str, int]] = dict) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store, extra))
    return registry


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics in a daemon thread; returns the port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
