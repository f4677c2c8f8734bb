"""Prometheus metrics of the router, `swaserve_router_<what>_<unit>`, in a registry per app.

Routing: decisions by reason, the chosen prefill worker's raw and window-safe match (fractions of
the prompt) and their gap, the chosen workers' load, decision latency, retries, workers marked down.
Accuracy (observe_prediction): per request, the window-safe cached tokens the decision predicted on
its prefill worker against the cached tokens that worker reported (PrefillReply), counted once, for
the attempt whose Prefill answered; and requests served per prefill worker.
Read at scrape time from the pool and the index (`watch`): Redis errors and reachability, whether
the prefix index is usable, workers and queue lengths per role (sums over the registry's records).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.router.routing import RoutingDecision

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ROUTING_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
FRACTION_BUCKETS = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
LOAD_BUCKETS = (0, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
# predicted - reported cached tokens: < 0 the router under-predicted (a missed hit at worst), > 0 it
# over-predicted (a phantom hit at worst); errors are whole tokens, so le=-1 .. le=0 counts exact ones.
# A histogram with negative buckets exports no _sum: the signed total is predicted - reported counters.
_ERR = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
ERROR_BUCKETS = (*(-x for x in reversed(_ERR)), -1, 0, *_ERR)


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
        self._routing_metrics(r)
        self._accuracy_metrics(r)

    def _routing_metrics(self, r: CollectorRegistry) -> None:
        self.decisions = Counter(
            "swaserve_router_decisions",
            "Routing decisions by reason (cache_hit, load_over_cache, cache_miss, index_unavailable, no_index)",
            ["reason"],
            registry=r,
        )
        self.bucket_decisions = Counter(
            "swaserve_router_bucket_decisions",
            "Routing decisions by the length bucket that served them; fallback=1 when the prompt's own "
            "bucket had no worker",
            ["bucket", "fallback"],
            registry=r,
        )
        self.match_fraction = Histogram(
            "swaserve_router_match_fraction",
            "Chosen prefill worker's cached prefix as a fraction of the prompt: raw (full-attention KV) "
            "and safe (window-safe, what routing counts)",
            ["kind"],
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.match_gap = Histogram(
            "swaserve_router_match_gap_fraction",
            "raw - safe match of the chosen prefill worker, as a fraction of the prompt",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.match_tokens = Counter(
            "swaserve_router_match_tokens",
            "Prompt tokens matched on the chosen prefill worker, raw and window-safe",
            ["kind"],
            registry=r,
        )
        self.chosen_load = Histogram(
            "swaserve_router_chosen_load_tokens",
            "Load (queued + running tokens, from the registry) of the chosen worker, by role",
            ["role"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.routing_seconds = Histogram(
            "swaserve_router_routing_seconds",
            "Time to make one routing decision (hash, index match, score, pick)",
            buckets=ROUTING_BUCKETS,
            registry=r,
        )
        self.retries = Counter(
            "swaserve_router_retries", "Requests retried on other workers before the first token", registry=r
        )
        self.marked_down = Counter(
            "swaserve_router_marked_down",
            "Workers marked down after failing a request and a Health probe",
            ["role"],
            registry=r,
        )

    def _accuracy_metrics(self, r: CollectorRegistry) -> None:
        self.prediction_error = Histogram(
            "swaserve_router_predicted_cached_error_tokens",
            "Per request: cached tokens the router predicted on its prefill worker (window-safe match) "
            "minus the cached tokens the worker reported; > 0 over-predicted, < 0 under-predicted",
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.prediction_error_fraction = Histogram(
            "swaserve_router_predicted_cached_error_fraction",
            "Per request: |predicted - reported cached tokens| as a fraction of the prompt",
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.predicted_cached = Counter(
            "swaserve_router_predicted_cached_tokens",
            "Cached tokens the router predicted on the prefill workers it chose (requests counted)",
            registry=r,
        )
        self.reported_cached = Counter(
            "swaserve_router_reported_cached_tokens",
            "Cached tokens the chosen prefill workers reported (requests counted)",
            registry=r,
        )
        self.prediction_abs_error = Counter(
            "swaserve_router_predicted_cached_abs_error_tokens",
            "|predicted - reported cached tokens|, summed over the requests counted",
            registry=r,
        )
        self.prediction_prompt_tokens = Counter(
            "swaserve_router_prediction_prompt_tokens",
            "Prompt tokens of the requests counted in the prediction metrics (the denominator)",
            registry=r,
        )
        self.phantom_hits = Counter(
            "swaserve_router_phantom_hits",
            "Requests the router predicted a hit for (> 0 cached tokens) that the worker reported 0 for",
            registry=r,
        )
        self.missed_hits = Counter(
            "swaserve_router_missed_hits",
            "Requests the router predicted no hit for that the worker reported cached tokens for",
            registry=r,
        )
        self.prefill_requests = Counter(
            "swaserve_router_prefill_requests",
            "Requests whose Prefill a worker answered, by the worker's id",
            ["worker"],
            registry=r,
        )

    def observe_prediction(self, d: RoutingDecision, reported_cached: int) -> None:
        """The request's decision (`safe_match_tokens` on `d.prefill`, as it was made) against the
        cached tokens its prefill worker reported; once per request (the attempt that answered)."""
        predicted, prompt = d.safe_match_tokens, d.prompt_tokens
        reported = max(0, min(reported_cached, prompt))
        error = predicted - reported
        self.prediction_error.observe(error)
        self.prediction_error_fraction.observe(abs(error) / prompt if prompt else 0.0)
        self.predicted_cached.inc(predicted)
        self.reported_cached.inc(reported)
        self.prediction_abs_error.inc(abs(error))
        self.prediction_prompt_tokens.inc(prompt)
        if predicted > 0 and reported == 0:
            self.phantom_hits.inc()
        elif predicted == 0 and reported > 0:
            self.missed_hits.inc()
        self.prefill_requests.labels(worker=d.prefill.worker_id).inc()

    def observe_decision(self, d: RoutingDecision, seconds: float) -> None:
        self.routing_seconds.observe(seconds)
        self.decisions.labels(reason=d.reason).inc()
        if d.bucket:
            self.bucket_decisions.labels(bucket=d.bucket, fallback="1" if d.bucket_fallback else "0").inc()
        raw, safe = d.raw_match_fraction, d.safe_match_fraction
        self.match_fraction.labels(kind="raw").observe(raw)
        self.match_fraction.labels(kind="safe").observe(safe)
        self.match_gap.observe(max(0.0, raw - safe))
        self.match_tokens.labels(kind="raw").inc(d.raw_match_tokens)
        self.match_tokens.labels(kind="safe").inc(d.safe_match_tokens)
        self.chosen_load.labels(role="prefill").observe(d.prefill.load_tokens)
        self.chosen_load.labels(role="decode").observe(d.decode.load_tokens)

    def watch(
        self, pool: Any, index: Any, index_usable: Callable[[], bool], index_errors: Callable[[], int]
    ) -> None:
        """Export, at scrape time, what the pool and the index follower know (see the module doc)."""
        self.registry.register(_StateCollector(pool, index, index_usable, index_errors))

    def observe_prefill(self, prompt_len: int, cached: int) -> None:
        cached = max(0, min(cached, prompt_len))
        self.prompt_tokens.labels(source="computed").inc(prompt_len - cached)
        self.prompt_tokens.labels(source="l1").inc(cached)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(
        self, pool: Any, index: Any, index_usable: Callable[[], bool], index_errors: Callable[[], int]
    ) -> None:
        self.pool, self.index = pool, index
        self.index_usable, self.index_errors = index_usable, index_errors

    def collect(self) -> Iterator[Any]:
        errors = int(getattr(self.pool, "redis_errors", 0)) + int(getattr(self.index, "redis_errors", 0) or 0)
        c = CounterMetricFamily(
            "swaserve_router_redis_errors", "Failed Redis reads (discovery and KV index)", value=errors
        )
        yield c
        ok = bool(getattr(self.pool, "redis_ok", True)) and bool(getattr(self.index, "redis_ok", True))
        yield GaugeMetricFamily("swaserve_router_redis_up", "1 while Redis answers the router", value=int(ok))
        yield GaugeMetricFamily(
            "swaserve_router_index_usable",
            "1 while routing is cache-aware (prefix index ready and its Redis reachable)",
            value=int(self.index_usable()),
        )
        yield CounterMetricFamily(
            "swaserve_router_index_errors", "Prefix index lookups that failed", value=self.index_errors()
        )
        workers = GaugeMetricFamily("swaserve_router_workers", "Routable workers by role", labels=["role"])
        waiting = GaugeMetricFamily(
            "swaserve_router_queued_requests", "Requests waiting on the workers of a role", labels=["role"]
        )
        queued = GaugeMetricFamily(
            "swaserve_router_queued_tokens", "Prompt tokens queued on the workers of a role", labels=["role"]
        )
        running = GaugeMetricFamily(
            "swaserve_router_running_requests", "Requests running on the workers of a role", labels=["role"]
        )
        records = getattr(self.pool, "routable_records", None)
        for role in ("prefill", "decode"):
            recs = records(role) if records is not None else []
            workers.add_metric([role], len(recs) if records is not None else _count(self.pool, role))
            waiting.add_metric([role], sum(r.waiting for r in recs))
            queued.add_metric([role], sum(r.queued_tokens for r in recs))
            running.add_metric([role], sum(r.running for r in recs))
        yield from (workers, waiting, queued, running)


def _count(pool: Any, role: str) -> int:
    try:
        return len(pool.prefill_workers() if role == "prefill" else pool.decode_workers())
    except Exception:  # noqa: BLE001 - a scrape never fails on discovery trouble
        return 0
