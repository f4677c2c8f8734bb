"""RouterMetrics: prompt tokens by source add up, length buckets, pre-created series, and the
residency/fencing collector reading the index's and the writer's counters (stand-in objects carry
only the counter attributes the collector reads)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from services.router.metrics import RouterMetrics
from services.router.policy.config import DEFAULT_BUCKETS


def samples(m: RouterMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(m.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_prompt_tokens_by_source_sum_to_the_prompt_and_exist_at_zero() -> None:
    m = RouterMetrics()
    before = samples(m)
    for src in ("computed", "l1", "l2", "l3"):
        assert before[("swaserve_router_prompt_tokens_total", (("source", src),))] == 0
    m.observe_prefill(1000, cached=600, l2=200, l3=100)
    m.observe_prefill(50, cached=80, l2=90, l3=5)  # clamped: cached <= prompt, l2 + l3 <= cached
    got = {k[1][0][1]: v for k, v in samples(m).items() if k[0] == "swaserve_router_prompt_tokens_total"}
    assert got == {"computed": 400, "l1": 300, "l2": 250, "l3": 100}
    assert sum(got.values()) == 1050


def test_length_buckets_label_latency_and_are_created_up_front() -> None:
    m = RouterMetrics()
    assert m.bucket_of(10) == "all"
    m.use_buckets(DEFAULT_BUCKETS)
    assert [m.bucket_of(n) for n in (1, 65536, 65537, 1 << 20, 5 << 20)] == [
        "short",
        "short",
        "medium",
        "long",
        "long",
    ]
    s = samples(m)
    for b in ("short", "medium", "long"):
        for h in ("ttft_seconds", "tpot_seconds", "itl_seconds", "e2e_latency_seconds"):
            assert s[(f"swaserve_router_{h}_count", (("bucket", b),))] == 0
    assert ("swaserve_router_ttft_seconds_bucket", (("bucket", "long"), ("le", "512.0"))) in s
    assert s[("swaserve_router_requests_total", (("endpoint", "/v1/completions"), ("status", "503")))] == 0
    assert s[("swaserve_router_decisions_total", (("reason", "index_unavailable"),))] == 0


def test_residency_collector_reads_the_index_and_the_writer() -> None:
    class PendingLayerCounters:  # what services/common/pending_residency.PendingLayer exposes
        added, replaced, expired, dropped = 7, 3, 2, 1

        def __len__(self) -> int:
            return 4

    layer = PendingLayerCounters()
    index = SimpleNamespace(index=SimpleNamespace(pending=layer), fenced=2, redis_ok=True, redis_errors=0)
    writer = SimpleNamespace(recorded=9, dropped=1, lost=0, write_errors=5)
    pool = SimpleNamespace(
        redis_ok=True,
        redis_errors=0,
        routable_records=lambda role: [
            SimpleNamespace(worker_id=f"{role}-a", waiting=1, queued_tokens=300, running=2)
        ],
    )
    m = RouterMetrics()
    m.watch(pool, index, lambda: True, lambda: 0, residency=writer)
    s = samples(m)
    assert s[("swaserve_router_pending_entries", ())] == 4
    assert {k[1][0][1]: v for k, v in s.items() if k[0] == "swaserve_router_pending_events_total"} == {
        "added": 7,
        "replaced": 3,
        "expired": 2,
        "dropped": 1,
    }
    assert s[("swaserve_router_fenced_workers_total", ())] == 2
    assert s[("swaserve_router_residency_writes_total", (("outcome", "write_errors"),))] == 5
    assert s[("swaserve_router_worker_queued_tokens", (("role", "decode"), ("worker", "decode-a")))] == 300
    # a router without residency or a prefix index still exports the families, at 0
    bare = RouterMetrics()
    bare.watch(pool, None, lambda: False, lambda: 0)
    b = samples(bare)
    assert (
        b[("swaserve_router_pending_entries", ())] == 0
        and b[("swaserve_router_fenced_workers_total", ())] == 0
    )
