"""The decode worker's Prometheus metrics (`swaserve_decode_*`)."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from services.worker.engine_loop import EngineLoop
from services.worker.loop_metrics import LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, KVPoolCollector, loop_gauges


class DecodeGauges(Protocol):
    """What the gauges read from the decode worker (DecodeWorker is one; worker.py imports this module)."""

    loop: EngineLoop

    def reserved_tokens(self) -> int: ...

    def pending_count(self) -> int: ...


class DecodeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.queue_seconds = Histogram(
            "swaserve_decode_queue_seconds", "time from Decode to the request running (KV wait + install)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot_seconds = Histogram(
            "swaserve_decode_tpot_seconds", "time per output token after the first",
            buckets=TOKEN_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generated_tokens = Counter(
            "swaserve_decode_generated_tokens", "tokens decoded here (the prefill worker's first excluded)",
            registry=r,
        )  # fmt: skip
        self.kv_bytes = Counter(
            "swaserve_decode_kv_bytes", "bytes of KV received from prefill workers", registry=r
        )
        self.requests = Counter(
            "swaserve_decode_requests", "Decode calls by outcome", ["outcome"], registry=r
        )
        self.reservations = Counter(
            "swaserve_decode_reservations", "Reserve calls by result", ["result"], registry=r
        )
        self.expired = Counter(
            "swaserve_decode_expired", "reservations / received KV dropped unused after their TTL",
            ["what"], registry=r,
        )  # fmt: skip
        # every label value up front: a rate over it is 0 before the first event, not absent
        for outcome in ("ok", "error", "aborted", "cancelled", "no_kv", "no_room", "invalid"):
            self.requests.labels(outcome)
        for result in ("ok", "refused"):
            self.reservations.labels(result)
        for what in ("reservation", "kv"):
            self.expired.labels(what)
        self._bound = False

    def bind(self, worker: DecodeGauges) -> None:
        if self._bound:
            return
        self._bound = True
        loop_gauges(self.registry, "decode", lambda: worker.loop.stats)
        self.registry.register(KVPoolCollector("decode", lambda: worker.loop.engine))
        reserved = Gauge(
            "swaserve_decode_reserved_kv_tokens", "KV tokens held by reservations", registry=self.registry
        )
        reserved.set_function(lambda: float(worker.reserved_tokens()))
        pending = Gauge(
            "swaserve_decode_pending_kv_requests",
            "received KV waiting for its Decode call",
            registry=self.registry,
        )
        pending.set_function(lambda: float(worker.pending_count()))

    def observe_tokens(self, n: int, seconds: float) -> None:
        """n tokens arrived together after `seconds`: each took seconds / n."""
        self.generated_tokens.inc(n)
        for _ in range(n):
            self.tpot_seconds.observe(seconds / n)
