"""Prometheus metrics of the router, `swaserve_router_<what>_<unit>`, in a registry per app.

Routing: decisions by reason, the chosen prefill worker's raw and window-safe match (fractions of
the prompt) and their gap, the chosen workers' load, decision latency, retries, workers marked down.
Accuracy (observe_prediction): per request, the window-safe cached tokens the decision predicted on
its prefill worker against the cached tokens that worker reported (PrefillReply), counted once, for
the attempt whose Prefill answered; and requests served per prefill worker.
Read at scrape time from the pool and the index (`watch`): Redis errors and reachability, whether
the prefix index is usable, workers and queue lengths per role (sums over the registry's records),
each routable worker's load; the index's pending (routing-time residency) entries and fenced
workers, and the residency writer's counters when one is passed.
Latency histograms (TTFT, TPOT, ITL, E2E) carry the prompt's length bucket (`use_buckets`); every
label value the router knows of is created at start-up, so a rate over it reads 0, not "no data".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from services.router.routing import RoutingDecision

# up to 512 s: a 1M-token prompt on the long bucket, queue included, lands in the last buckets
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
)  # fmt: skip
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
SOURCES = ("computed", "l1", "l2", "l3")  # where a prompt token's KV came from
REASONS = ("cache_hit", "load_over_cache", "cache_miss", "index_unavailable", "no_index")
ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
STATUSES = ("200", "400", "404", "500", "502", "503", "504")
ROLES = ("prefill", "decode")
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
            "Time to first token of each choice, from request arrival, by the prompt's length bucket",
            ["bucket"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "swaserve_router_tpot_seconds",
            "Time per output token after the first, per choice, by the prompt's length bucket",
            ["bucket"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "swaserve_router_itl_seconds",
            "Inter-token latency: time between two streamed chunks over the tokens of the later one",
            ["bucket"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "swaserve_router_e2e_latency_seconds",
            "End-to-end latency of completed requests, by the (first) prompt's length bucket",
            ["bucket"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "swaserve_router_prompt_tokens",
            "Prompt tokens by where their KV came from: computed, l1 (the prefill worker's device "
            "cache), l2 (its host tier), l3 (GCache); the four add up to the prompt tokens",
            ["source"],
            registry=r,
        )
        self.completion_tokens = Counter("swaserve_router_completion_tokens", "Generated tokens", registry=r)
        self._routing_metrics(r)
        self._accuracy_metrics(r)
        self._bucket_limits: tuple[tuple[str, int], ...] = ()
        self._precreate()

    def _precreate(self) -> None:
        for source in SOURCES:
            self.prompt_tokens.labels(source=source)
        for reason in REASONS:
            self.decisions.labels(reason=reason)
        for endpoint in ENDPOINTS:
            for status in STATUSES:
                self.requests.labels(endpoint=endpoint, status=status)
        for kind in ("raw", "safe"):
            self.match_fraction.labels(kind=kind)
            self.match_tokens.labels(kind=kind)
        for role in ROLES:
            self.chosen_load.labels(role=role)
            self.marked_down.labels(role=role)

    def use_buckets(self, buckets: Sequence[Any]) -> None:
        """The router's length buckets (LengthBucket: name, max_tokens): latency series of each
        are created now, and `bucket_of` names a prompt's bucket as the length filter does."""
        self._bucket_limits = tuple((b.name, int(b.max_tokens)) for b in buckets)
        for name, _ in self._bucket_limits:
            for h in (self.ttft, self.tpot, self.itl, self.e2e):
                h.labels(bucket=name)
            for fallback in ("0", "1"):
                self.bucket_decisions.labels(bucket=name, fallback=fallback)

    def bucket_of(self, prompt_len: int) -> str:
        """The first bucket the prompt fits in, the last if none ("all" before use_buckets)."""
        for name, limit in self._bucket_limits:
            if prompt_len <= limit:
                return name
        return self._bucket_limits[-1][0] if self._bucket_limits else "all"

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
        self,
        pool: Any,
        index: Any,
        index_usable: Callable[[], bool],
        index_errors: Callable[[], int],
        residency: Any = None,
    ) -> None:
        """Export, at scrape time, what the pool, the index follower and the routing-time residency
        writer (optional) know (see the module doc)."""
        self.registry.register(_StateCollector(pool, index, index_usable, index_errors))
        self.registry.register(ResidencyCollector(index, residency))

    def observe_prefill(self, prompt_len: int, cached: int, l2: int = 0, l3: int = 0) -> None:
        """One choice's prompt by source; `l2` and `l3` are parts of `cached` (the rest is l1)."""
        cached = max(0, min(cached, prompt_len))
        l2 = max(0, min(l2, cached))
        l3 = max(0, min(l3, cached - l2))
        self.prompt_tokens.labels(source="computed").inc(prompt_len - cached)
        self.prompt_tokens.labels(source="l1").inc(cached - l2 - l3)
        self.prompt_tokens.labels(source="l2").inc(l2)
        self.prompt_tokens.labels(source="l3").inc(l3)

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
        load = GaugeMetricFamily(
            "swaserve_router_worker_queued_tokens",
            "Prompt tokens queued on each routable worker, as the registry reports them",
            labels=["role", "worker"],
        )
        records = getattr(self.pool, "routable_records", None)
        for role in ROLES:
            recs = records(role) if records is not None else []
            workers.add_metric([role], len(recs) if records is not None else _count(self.pool, role))
            waiting.add_metric([role], sum(r.waiting for r in recs))
            queued.add_metric([role], sum(r.queued_tokens for r in recs))
            running.add_metric([role], sum(r.running for r in recs))
            for rec in recs:
                load.add_metric([role, str(getattr(rec, "worker_id", "?"))], rec.queued_tokens)
        yield from (workers, waiting, queued, running, load)


class ResidencyCollector(Collector):
    """Routing-time residency, read at scrape time: the prefix index's pending layer
    (`index.index.pending`: entries now, added, replaced by the worker's own events, expired,
    dropped), workers fenced by the index follower (`index.fenced`), and the writer's counters
    (services/router/residency.py: recorded, dropped, lost, write errors). What an object lacks is
    exported as 0, so the series exist whichever router build runs."""

    PENDING = (
        ("added", "pending entries added to the prefix index"),
        ("replaced", "pending entries replaced by the worker's own KV events"),
        ("expired", "pending entries expired unconfirmed"),
        ("dropped", "pending entries dropped (request ended, worker left or fenced, index cleared)"),
    )
    WRITER = (
        ("recorded", "routing decisions written as pending residency"),
        ("dropped", "pending residency withdrawn by the router (request failed)"),
        ("lost", "pending residency messages not written (Redis down, queue full)"),
        ("write_errors", "failed writes of pending residency to Redis"),
    )

    def __init__(self, index: Any, residency: Any = None) -> None:
        self.index, self.residency = index, residency

    def collect(self) -> Iterator[Any]:
        prefix_index = getattr(self.index, "index", None)
        pending = getattr(prefix_index, "pending", None)
        yield GaugeMetricFamily(
            "swaserve_router_pending_entries",
            "pending (routed, not yet confirmed) residency entries in the prefix index",
            value=_len(pending),
        )
        fam = CounterMetricFamily(
            "swaserve_router_pending_events", "pending residency entries by what happened", labels=["event"]
        )
        for field, _doc in self.PENDING:
            fam.add_metric([field], int(getattr(pending, field, 0) or 0))
        yield fam
        yield CounterMetricFamily(
            "swaserve_router_fenced_workers",
            "workers whose index state of an earlier incarnation was dropped (restart fencing)",
            value=int(getattr(self.index, "fenced", 0) or 0),
        )
        writes = CounterMetricFamily(
            "swaserve_router_residency_writes",
            "the residency writer's messages by outcome",
            labels=["outcome"],
        )
        for field, _doc in self.WRITER:
            writes.add_metric([field], int(getattr(self.residency, field, 0) or 0))
        yield writes


def _len(obj: Any) -> int:
    try:
        return len(obj) if obj is not None else 0
    except TypeError:
        return 0


def _count(pool: Any, role: str) -> int:
    try:
        return len(pool.prefill_workers() if role == "prefill" else pool.decode_workers())
    except Exception:  # noqa: BLE001 - a scrape never fails on discovery trouble
        return 0
