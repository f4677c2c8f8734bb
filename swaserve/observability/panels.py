"""Every dashboard panel, once: title, unit and PromQL targets, with no Grafana import.

The same specs feed the Grafana JSON (`grafana.py`), the PNG renderer (`render.py`) and the live
check (tests/observability), so a panel that Grafana shows is a query that was evaluated against a
real Prometheus scraping a real cluster. `$__rate_interval` is Grafana's; elsewhere `expr_for`
substitutes a window.

A panel whose series exist only when an optional feature runs says so in `needs` (one of FEATURES);
the live check skips it and checks that its queries are indeed empty there.
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = "$__rate_interval"
# feature -> what brings it; a panel needing one that the cluster lacks has no data, by design
FEATURES = {
    "gcache": "GCache nodes (swaserve up --gcache N, the chart's gcache.enabled)",
    "encoder": "multimodal encoder services (not built yet: services/encoder is empty)",
    "mtp": "MTP speculative decoding metrics (not exported yet)",
}


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    title: str
    targets: tuple[Target, ...]
    unit: str = "short"  # a Grafana unit id: s, percentunit, bytes, Bps, reqps, short
    kind: str = "timeseries"  # or "stat"
    description: str = ""
    needs: str = ""  # a FEATURES key, or "" when every cluster has the series

    def __post_init__(self) -> None:
        if self.kind not in ("timeseries", "stat"):
            raise ValueError(f"panel {self.title!r}: unknown kind {self.kind!r}")
        if self.needs and self.needs not in FEATURES:
            raise ValueError(f"panel {self.title!r}: unknown feature {self.needs!r}")
        if not self.targets:
            raise ValueError(f"panel {self.title!r} has no query")


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]

    @property
    def panels(self) -> tuple[Panel, ...]:
        return tuple(p for r in self.rows for p in r.panels)


def expr_for(expr: str, window: str) -> str:
    """The query outside Grafana: `$__rate_interval` becomes `window` (e.g. "30s")."""
    return expr.replace(RATE, window)


def T(expr: str, legend: str = "") -> Target:  # noqa: N802 - reads like a table row
    return Target(" ".join(expr.split()), legend)


def _quantiles(metric: str, by: str = "bucket") -> tuple[Target, ...]:
    return tuple(
        T(
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket[{RATE}])))",
            f"p{int(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.9, 0.99)
    )


def _rate(metric: str, by: str = "", legend: str = "") -> Target:
    group = f" by ({by})" if by else ""
    return T(f"sum{group} (rate({metric}[{RATE}]))", legend or (f"{{{{{by}}}}}" if by else ""))


HIT_RATIO = (
    'sum(rate(swaserve_router_prompt_tokens_total{{source="{src}"}}[{w}])) '
    "/ sum(rate(swaserve_router_prompt_tokens_total[{w}]))"
)


def overview() -> Dashboard:
    tiers = tuple(T(HIT_RATIO.format(src=s, w=RATE), s) for s in ("l1", "l2", "l3"))
    return Dashboard(
        "swaserve-overview",
        "swaserve / overview",
        "Requests, errors, TTFT by length bucket, token-weighted cache hit rate by tier, window-safe vs raw match",
        (
            Row("Traffic", (
                Panel("Request rate", (_rate("swaserve_router_requests_total", "endpoint"),), "reqps"),
                Panel("Error ratio (4xx + 5xx)", (T(
                    f'sum(rate(swaserve_router_requests_total{{status=~"[45].."}}[{RATE}])) '
                    f"/ sum(rate(swaserve_router_requests_total[{RATE}]))", "errors"),), "percentunit"),
                Panel("In flight", (T("sum(swaserve_router_inflight_requests)", "requests"),), kind="stat"),
            )),
            Row("Latency", (
                Panel("TTFT by length bucket", _quantiles("swaserve_router_ttft_seconds"), "s",
                      description="time to first token at the router, p50/p90/p99 per prompt-length bucket"),
                Panel("TPOT by length bucket", _quantiles("swaserve_router_tpot_seconds"), "s"),
                Panel("End-to-end latency", _quantiles("swaserve_router_e2e_latency_seconds"), "s"),
            )),
            Row("Cache", (
                Panel("Token-weighted hit rate by tier", tiers, "percentunit",
                      description="prompt tokens whose KV came from l1 (device), l2 (host), l3 (GCache), "
                      "over all prompt tokens; computed is the rest"),
                Panel("Prompt tokens by source", (_rate("swaserve_router_prompt_tokens_total", "source"),),
                      "short", description="tokens/s; computed + l1 + l2 + l3 = prompt tokens"),
                Panel("Window-safe vs raw match", (
                    _rate("swaserve_router_match_tokens_total", "kind"),
                    T(f'sum(rate(swaserve_router_match_tokens_total{{kind="raw"}}[{RATE}])) '
                      f'- sum(rate(swaserve_router_match_tokens_total{{kind="safe"}}[{RATE}]))', "gap"),
                ), "short", description="tokens/s the chosen prefill worker matched: raw (full-attention KV) "
                   "vs window-safe (what counts as a hit); the gap is lost to missing SWA tails"),
            )),
        ),
    )  # fmt: skip


def router() -> Dashboard:
    return Dashboard(
        "swaserve-router",
        "swaserve / router",
        "Routing decisions, latency, load per worker, prediction accuracy, pending residency, Redis",
        (
            Row("Decisions", (
                Panel("Decisions by reason", (_rate("swaserve_router_decisions_total", "reason"),), "ops"),
                Panel("Routing latency", _quantiles("swaserve_router_routing_seconds", by="job"), "s"),
                Panel("Decisions by length bucket", (
                    _rate("swaserve_router_bucket_decisions_total", "bucket, fallback"),), "ops"),
            )),
            Row("Load", (
                Panel("Queued tokens per worker", (
                    T("sum by (role, worker) (swaserve_router_worker_queued_tokens)", "{{role}} {{worker}}"),),
                      "short"),
                Panel("Workers by role", (T("sum by (role) (swaserve_router_workers)", "{{role}}"),)),
                Panel("Requests served per prefill worker", (
                    _rate("swaserve_router_prefill_requests_total", "worker"),), "reqps"),
            )),
            Row("Prediction", (
                Panel("Predicted vs reported cached tokens", (
                    _rate("swaserve_router_predicted_cached_tokens_total", legend="predicted"),
                    _rate("swaserve_router_reported_cached_tokens_total", legend="reported"),
                ), "short"),
                Panel("Prediction error (fraction of prompt)", (T(
                    f"sum(rate(swaserve_router_predicted_cached_abs_error_tokens_total[{RATE}])) "
                    f"/ sum(rate(swaserve_router_prediction_prompt_tokens_total[{RATE}]))", "|error|"),),
                      "percentunit"),
                Panel("Phantom and missed hits", (
                    _rate("swaserve_router_phantom_hits_total", legend="phantom"),
                    _rate("swaserve_router_missed_hits_total", legend="missed"),), "ops"),
            )),
            Row("Residency and Redis", (
                Panel("Pending residency entries", (T("sum(swaserve_router_pending_entries)", "entries"),)),
                Panel("Pending entries by event", (_rate("swaserve_router_pending_events_total", "event"),),
                      "ops"),
                Panel("Redis up (as the router sees it)", (T("min(swaserve_router_redis_up)", "up"),),
                      kind="stat"),
                Panel("Redis errors and fenced workers", (
                    _rate("swaserve_router_redis_errors_total", legend="redis errors"),
                    _rate("swaserve_router_fenced_workers_total", legend="fenced"),
                    _rate("swaserve_router_index_errors_total", legend="index errors"),), "ops"),
            )),
        ),
    )  # fmt: skip


def workers() -> Dashboard:
    pool = "sum by (instance, pool) ({svc}_kv_pool_used_pages) / sum by (instance, pool) ({svc}_kv_pool_capacity_pages)"
    return Dashboard(
        "swaserve-workers",
        "swaserve / workers",
        "Prefill and decode workers: queues, KV pools (full and SWA), throughput, KV transfer",
        (
            Row("Queues", (
                Panel("Waiting requests per worker", (
                    T("sum by (instance) (swaserve_prefill_waiting_requests)", "prefill {{instance}}"),
                    T("sum by (instance) (swaserve_decode_waiting_requests)", "decode {{instance}}"),)),
                Panel("Prefill queue time", _quantiles("swaserve_prefill_queue_seconds"), "s"),
                Panel("Decode queue time (KV wait + install)", _quantiles("swaserve_decode_queue_seconds", by="job"),
                      "s"),
            )),
            Row("KV pools", (
                Panel("Prefill KV pool usage (full, SWA)", (T(pool.format(svc="swaserve_prefill"),
                                                                 "{{pool}} {{instance}}"),), "percentunit"),
                Panel("Decode KV pool usage (full, SWA)", (T(pool.format(svc="swaserve_decode"),
                                                                "{{pool}} {{instance}}"),), "percentunit"),
                Panel("Evictable cached pages", (
                    T("sum by (pool) (swaserve_prefill_kv_pool_evictable_pages)", "prefill {{pool}}"),)),
            )),
            Row("Throughput", (
                Panel("Prefill tokens/s by source", (_rate("swaserve_prefill_prompt_tokens_total", "source"),)),
                Panel("Decode tokens/s", (_rate("swaserve_decode_generated_tokens_total", legend="generated"),)),
                Panel("Requests by outcome", (
                    _rate("swaserve_prefill_requests_total", "outcome", "prefill {{outcome}}"),
                    _rate("swaserve_decode_requests_total", "outcome", "decode {{outcome}}"),), "reqps"),
            )),
            Row("KV transfer", (
                Panel("KV bytes shipped", (_rate("swaserve_prefill_kv_bytes_total", "transport"),
                                           _rate("swaserve_decode_kv_bytes_total", legend="received")), "Bps"),
                Panel("KV transfer time", _quantiles("swaserve_prefill_kv_transfer_seconds", by="transport"), "s"),
                Panel("L3 traffic from workers", (
                    _rate("swaserve_prefill_l3_write_bytes_total", legend="written"),
                    _rate("swaserve_prefill_l3_lookup_bytes_total", legend="fetched"),), "Bps", needs="gcache"),
            )),
        ),
    )  # fmt: skip


def gcache() -> Dashboard:
    return Dashboard(
        "swaserve-gcache",
        "swaserve / gcache",
        "GCache (L3) nodes: bytes held, hits, misses, evictions, drains",
        (
            Row("Capacity", (
                Panel("Bytes held by tier", (T("sum by (tier) (swaserve_gcache_used_bytes)", "{{tier}}"),),
                      "bytes", needs="gcache"),
                Panel("Tier usage", (T("sum by (tier) (swaserve_gcache_used_bytes) "
                                       "/ sum by (tier) (swaserve_gcache_capacity_bytes)", "{{tier}}"),),
                      "percentunit", needs="gcache"),
                Panel("Bytes in and out", (_rate("swaserve_gcache_bytes_in_total", legend="in"),
                                           _rate("swaserve_gcache_bytes_out_total", legend="out")),
                      "Bps", needs="gcache"),
            )),
            Row("Lookups", (
                Panel("Hits and misses by tier", (_rate("swaserve_gcache_hits_total", "tier", "hit {{tier}}"),
                                                  _rate("swaserve_gcache_misses_total", "tier", "miss {{tier}}")),
                      "ops", needs="gcache"),
                Panel("Evictions by tier", (_rate("swaserve_gcache_evictions_total", "tier"),), "ops",
                      needs="gcache"),
                Panel("Draining nodes and migrated bytes", (
                    T("sum(swaserve_gcache_draining)", "draining"),
                    _rate("swaserve_gcache_migrated_bytes_total", "direction"),), needs="gcache"),
            )),
        ),
    )  # fmt: skip


def encoder() -> Dashboard:
    return Dashboard(
        "swaserve-encoder",
        "swaserve / encoder",
        "Multimodal encoders and MTP acceptance (panels wait for those services' metrics)",
        (
            Row("Encoder", (
                Panel("Encoder QPS", (_rate("swaserve_encoder_requests_total", legend="items/s"),), "reqps",
                      needs="encoder"),
                Panel("Embedding cache hit rate", (T(
                    f"sum(rate(swaserve_encoder_cache_hits_total[{RATE}])) "
                    f"/ sum(rate(swaserve_encoder_requests_total[{RATE}]))", "hit rate"),), "percentunit",
                      needs="encoder"),
            )),
            Row("Speculative decoding", (
                Panel("MTP acceptance rate", (T(
                    f"sum(rate(swaserve_decode_mtp_accepted_tokens_total[{RATE}])) "
                    f"/ sum(rate(swaserve_decode_mtp_draft_tokens_total[{RATE}]))", "accepted"),), "percentunit",
                      needs="mtp"),
            )),
        ),
    )  # fmt: skip


def dashboards() -> tuple[Dashboard, ...]:
    return (overview(), router(), workers(), gcache(), encoder())
