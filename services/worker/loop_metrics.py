"""Prometheus pieces every engine-backed worker shares: load gauges read from the loop, the server.

Each worker owns a CollectorRegistry (not the process-global one), so several workers can live in
one process (the tests) and each /metrics shows only its own series. Names follow
`swaserve_<service>_<what>_<unit>`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.worker.engine_loop import LoopStats

# up to 512 s: a 1M-token prompt's TTFT on the long bucket (queue included) lands in the last buckets
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BYTES_BUCKETS = tuple(float(4**i) * 1024 for i in range(1, 12))  # 4 KiB .. 4 GiB


def loop_gauges(registry: CollectorRegistry, service: str, stats: Callable[[], LoopStats]) -> None:
    """Gauges computed at scrape time from the loop's latest LoopStats snapshot."""
    fields = {
        "running_requests": ("requests running in the engine", "running"),
        "waiting_requests": ("requests queued in the engine", "waiting"),
        "free_kv_tokens": ("KV tokens the full pool can still take (free + evictable)", "free_tokens"),
        "capacity_kv_tokens": ("KV tokens the full pool holds", "capacity_tokens"),
        "queued_tokens": ("prompt tokens queued or admitted but not computed yet", "queued_tokens"),
    }

    def reader(attr: str) -> Callable[[], float]:
        return lambda: float(getattr(stats(), attr))

    for what, (doc, attr) in fields.items():
        Gauge(f"swaserve_{service}_{what}", doc, registry=registry).set_function(reader(attr))


L3_COUNTERS = {  # L3Counters field -> (metric suffix, help)
    "writes": ("l3_writes", "values written down to GCache (L3)"),
    "writes_dropped": ("l3_writes_dropped", "values not written down: too many bytes in flight"),
    "write_errors": ("l3_write_errors", "values GCache refused or could not place"),
    "write_bytes": ("l3_write_bytes", "bytes written down to GCache"),
    "fetches": ("l3_lookups", "L3 lookups of queued requests"),
    "fetch_hits": ("l3_lookup_hits", "L3 lookups that found a restorable prefix"),
    "fetch_pages": ("l3_lookup_pages", "pages fetched from L3 into the host tier"),
    "fetch_bytes": ("l3_lookup_bytes", "bytes fetched from L3"),
    "fetch_errors": ("l3_lookup_errors", "L3 lookups that failed or returned a value of the wrong size"),
}


class L3Collector(Collector):
    """The engine's L3 tier counters (services/engine/l3_tier.py), read at scrape time."""

    def __init__(self, service: str, counters: Callable[[], dict[str, int]]) -> None:
        self.service = service
        self.counters = counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        values = self.counters()
        for field, (name, doc) in L3_COUNTERS.items():
            yield CounterMetricFamily(f"swaserve_{self.service}_{name}", doc, value=values.get(field, 0))


class KVPoolCollector(Collector):
    """The engine's two KV pools (full attention, SWA), read at scrape time from the loop's engine:
    pages in all, pages held (by requests or the radix cache), and held pages the cache could evict.
    Reads are lock-free snapshots of ints the loop thread updates; a scrape may see one step late."""

    def __init__(self, service: str, engine: Callable[[], Any]) -> None:
        self.service = service
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        e = self.engine()
        p = f"swaserve_{self.service}_kv_pool"
        fams = {
            "capacity": GaugeMetricFamily(f"{p}_capacity_pages", "pages a KV pool holds", labels=["pool"]),
            "used": GaugeMetricFamily(
                f"{p}_used_pages", "pages held by requests or the prefix cache", labels=["pool"]
            ),
            "evictable": GaugeMetricFamily(
                f"{p}_evictable_pages", "held pages the prefix cache could give back", labels=["pool"]
            ),
        }
        pools = (
            ("full", e.full_pool, e.cache.evictable_full_pages),
            ("swa", e.swa_pool, e.cache.evictable_swa_pages),
        )
        for name, pool, evictable in pools:
            fams["capacity"].add_metric([name], pool.num_pages)
            fams["used"].add_metric([name], pool.num_used)
            fams["evictable"].add_metric([name], evictable())
        yield from fams.values()


def serve_metrics(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> int:
    """Serve /metrics on host:port in a daemon thread; returns the port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
