"""GET /ready (readiness) against GET /health (liveness), over real HTTP with uvicorn."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.router.workers import StaticWorkerPool, WorkerInfo
from tests.router.conftest import serve_router


class _SwitchPool(StaticWorkerPool):
    """A static pool whose discovery can be "not synced yet" or failing."""

    synced = True
    broken = False

    def prefill_workers(self) -> list[WorkerInfo]:
        if self.broken:
            raise RuntimeError("discovery broke")
        return super().prefill_workers()


@pytest.mark.parametrize(
    ("prefill", "decode", "status", "reason"),
    [
        ([], [], 503, "no_prefill_worker"),
        ([], ["d:1"], 503, "no_prefill_worker"),
        (["p:1"], [], 503, "no_decode_worker"),
        (["p:1", "p:2"], ["d:1"], 200, None),
    ],
)
def test_ready_needs_a_prefill_and_a_decode_worker(
    model_dir: Path, prefill: list[str], decode: list[str], status: int, reason: str | None
) -> None:
    router = serve_router(model_dir, StaticWorkerPool(prefill, decode))
    try:
        with router.http() as h:
            r = h.get("/ready")
            assert r.status_code == status
            body = r.json()
            assert body.get("reason") == reason
            assert (body["prefill_workers"], body["decode_workers"]) == (len(prefill), len(decode))
            assert h.get("/health").status_code == 200  # liveness, whatever readiness says
    finally:
        router.close()


def test_not_ready_until_discovery_synced_or_while_it_fails(model_dir: Path) -> None:
    pool = _SwitchPool(["p:1"], ["d:1"])
    router = serve_router(model_dir, pool)
    try:
        with router.http() as h:
            assert h.get("/ready").status_code == 200
            pool.synced = False
            r = h.get("/ready")
            assert (r.status_code, r.json()["reason"]) == (503, "discovery_not_synced")
            pool.synced, pool.broken = True, True
            r = h.get("/ready")
            assert r.status_code == 503 and r.json()["status"] == "not_ready"
            assert h.get("/health").status_code == 200
    finally:
        router.close()


def test_a_worker_marked_down_counts_out(model_dir: Path) -> None:
    pool = StaticWorkerPool(["p:1"], ["d:1"], down_seconds=30)
    router = serve_router(model_dir, pool)
    try:
        with router.http() as h:
            assert h.get("/ready").status_code == 200
            pool.mark_down("d:1")  # the only decode worker could not be reached
            assert h.get("/ready").json()["reason"] == "no_decode_worker"
    finally:
        router.close()
