"""A real decode worker process: GET /health (liveness) and GET /ready (readiness) on its metrics port.

Ready means: engine loaded, gRPC serving, and its first registration reached Redis. The worker is
started against a Redis port where nothing listens yet, so it serves gRPC but cannot register.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from services.common.netutil import free_port
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRegistry
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[2]


def _get(url: str) -> httpx.Response | None:
    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def test_ready_only_once_loaded_and_registered_and_not_while_stopping(tmp_path: Path) -> None:
    redis_port, mport = free_port(), free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    log = (tmp_path / "decode.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.decode.main", "--model", "mimo-tiny", "--host", "127.0.0.1",
         "--port", "0", "--metrics-port", str(mport), "--redis-url", redis_url, "--torch-threads", "1"],
        cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    redis = None
    base = f"http://127.0.0.1:{mport}"
    try:
        assert wait_for(lambda: (r := _get(f"{base}/health")) is not None and r.status_code == 200, 60), (
            tmp_path / "decode.log"
        ).read_text()
        # alive, and serving gRPC once loaded, but not registered: not ready
        assert wait_for(lambda: b"worker ready on" in (tmp_path / "decode.log").read_bytes(), 120)
        r = _get(f"{base}/ready")
        assert r is not None and (r.status_code, r.json()["reason"]) == (503, "not_registered")
        assert "swaserve_decode" in httpx.get(f"{base}/metrics", timeout=5).text

        redis = RedisServer(port=redis_port, log_path=tmp_path / "redis.log").start()
        assert wait_for(lambda: (r := _get(f"{base}/ready")) is not None and r.status_code == 200, 10)
        assert [w.role for w in WorkerRegistry(redis_url).list()] == ["decode"]

        proc.send_signal(signal.SIGTERM)  # draining: no longer ready (or gone), never ready again
        assert wait_for(lambda: (r := _get(f"{base}/ready")) is None or r.status_code == 503, 10)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if redis is not None:
            redis.stop()
        log.close()
