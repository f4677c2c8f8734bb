"""Start `swaserve up` as a real process group for integration tests, wait until it is healthy, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from services.common.netutil import free_port


@contextmanager
def swaserve_up(log: Path, *args: str, prefill_workers: int = 1, timeout: float = 300) -> Iterator[str]:
    """Yields the router's base URL once /health says ok with `prefill_workers` prefill workers."""
    port = free_port()
    argv = [sys.executable, "-m", "swaserve", "up", "--port", str(port), *args]
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"swaserve up exited {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                health = httpx.get(f"{base}/health", timeout=2).json()
                if health.get("status") == "ok" and health.get("prefill_workers") == prefill_workers:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"cluster not healthy in time:\n{log.read_text()[-4000:]}"
            time.sleep(0.5)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
