"""services/common/probe_http.py: /health, /ready and /metrics on one real HTTP server."""

from __future__ import annotations

import httpx
from prometheus_client import CollectorRegistry, Counter

from services.common.probe_http import ProbeServer


def test_probes_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("swaserve_test_things", "things", registry=registry).inc(3)
    state = {"ok": False, "reason": "loading"}
    server = ProbeServer(registry, 0, "127.0.0.1", lambda: (state["ok"], state["reason"]))
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert httpx.get(f"{base}/health").json() == {"status": "alive"}
        r = httpx.get(f"{base}/ready")
        assert (r.status_code, r.json()) == (503, {"status": "not_ready", "reason": "loading"})
        state["ok"] = True
        r = httpx.get(f"{base}/ready")
        assert (r.status_code, r.json()) == (200, {"status": "ready"})
        assert "swaserve_test_things_total 3.0" in httpx.get(f"{base}/metrics").text
    finally:
        server.close()


def test_a_failing_readiness_check_answers_503() -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    server = ProbeServer(CollectorRegistry(), 0, "127.0.0.1", broken)
    try:
        r = httpx.get(f"http://127.0.0.1:{server.port}/ready")
        assert r.status_code == 503 and "RuntimeError" in r.json()["reason"]
    finally:
        server.close()
