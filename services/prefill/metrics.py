"""The prefill worker's Prometheus metrics (`swaserve_prefill_*`).

Latency histograms carry the worker's length bucket (`--bucket`; "all" when it serves every length).
Every label value is created at start-up, so a rate over it is 0 before the first event, not absent.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from services.prefill.result import PrefillResult
from services.worker.engine_loop import EngineLoop
from services.worker.loop_metrics import BYTES_BUCKETS, LATENCY_BUCKETS, KVPoolCollector, loop_gauges


class PrefillMetrics:
    SOURCES = ("computed", "l1", "l2", "l3")
    OUTCOMES = ("ok", "invalid", "error", "aborted", "timeout", "kv_transfer_failed")
    TRANSPORTS = ("grpc", "shm", "torch")

    def __init__(self, registry: CollectorRegistry | None = None, bucket: str = "all") -> None:
        r = self.registry = registry or CollectorRegistry()
        self.bucket = bucket or "all"
        self.queue_seconds = Histogram(
            "swaserve_prefill_queue_seconds", "time from arrival to admission into a batch",
            ["bucket"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "swaserve_prefill_ttft_seconds", "time from arrival to the first token sampled (before the KV transfer)",
            ["bucket"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute_seconds = Histogram(
            "swaserve_prefill_compute_seconds", "time from admission to the first token sampled",
            ["bucket"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "swaserve_prefill_prompt_tokens", "prompt tokens by where their KV came from",
            ["source"], registry=r,
        )  # fmt: skip
        self.kv_bytes = Counter(
            "swaserve_prefill_kv_bytes", "bytes of KV shipped to decode workers", ["transport"], registry=r
        )
        self.kv_transfer_seconds = Histogram(
            "swaserve_prefill_kv_transfer_seconds", "time to ship one request's KV to its decode worker",
            ["transport"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.kv_request_bytes = Histogram(
            "swaserve_prefill_kv_request_bytes", "bytes of KV shipped per request",
            buckets=BYTES_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "swaserve_prefill_requests", "prefill requests by outcome", ["outcome"], registry=r
        )
        for source in self.SOURCES:
            self.prompt_tokens.labels(source)
        for outcome in self.OUTCOMES:
            self.requests.labels(outcome)
        for transport in self.TRANSPORTS:
            self.kv_bytes.labels(transport)
            self.kv_transfer_seconds.labels(transport)
        self._bound = False

    def bind_loop(self, loop: EngineLoop) -> None:
        if not self._bound:
            loop_gauges(self.registry, "prefill", lambda: loop.stats)
            self.registry.register(KVPoolCollector("prefill", lambda: loop.engine))
            self._bound = True

    def observe(self, result: PrefillResult, prompt_len: int, ttft: float) -> None:
        self.queue_seconds.labels(self.bucket).observe(result.queue_seconds)
        self.ttft_seconds.labels(self.bucket).observe(ttft)
        self.compute_seconds.labels(self.bucket).observe(result.prefill_seconds)
        lower = result.cached_tokens_l2 + result.cached_tokens_l3
        self.prompt_tokens.labels("l1").inc(result.cached_tokens - lower)
        self.prompt_tokens.labels("l2").inc(result.cached_tokens_l2)
        self.prompt_tokens.labels("l3").inc(result.cached_tokens_l3)
        self.prompt_tokens.labels("computed").inc(prompt_len - result.cached_tokens)
        self.requests.labels("ok").inc()

    def observe_transfer(self, transport: str, nbytes: int, seconds: float) -> None:
        self.kv_bytes.labels(transport).inc(nbytes)
        self.kv_transfer_seconds.labels(transport).observe(seconds)
        self.kv_request_bytes.observe(nbytes)
