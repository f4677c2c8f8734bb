"""Prometheus metrics of the router, `swaserve_router_<what>_<unit>`, in a registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "swaserve_router_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.inflight = Gauge("swaserve_router_inflight_requests", "Requests being served", registry=r)
        self.ttft = Histogram(
            "swaserve_router_ttft_seconds",
            "Time to first token of each choice, from request arrival",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "swaserve_router_tpot_seconds",
            "Time per output token after the first, per choice",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "swaserve_router_e2e_latency_seconds",
            "End-to-end latency of completed requests",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "swaserve_router_prompt_tokens",
            "Prompt tokens by where their KV came from (computed, l1 = prefill worker cache)",
            ["source"],
            registry=r,
        )
        self.completion_tokens = Counter("swaserve_router_completion_tokens", "Generated tokens", registry=r)

    def observe_prefill(self, prompt_len: int, cached: int) -> None:
        cached = max(0, min(cached, prompt_len))
        self.prompt_tokens.labels(source="computed").inc(prompt_len - cached)
        self.prompt_tokens.labels(source="l1").inc(cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)
