"""Start a `sim-worker` process from Python (benchmarks, tests) and wait until its workers serve.

with sim_workers("prefill", 2, "--redis-url", url, log=path) as fleet:
    fleet.workers      # their addresses (gRPC host:port, or http://host:port for role both)
# on exit: SIGTERM, wait; fleet.summary is the process's CPU-per-request line
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson


@dataclass
class SimFleet:
    proc: subprocess.Popen[bytes]
    log: Path
    ready: dict[str, Any]
    summary: str = ""  # the CPU line the process prints at exit
    workers: list[str] = field(default_factory=list)


@contextmanager
def sim_workers(
    role: str, count: int, *args: str, log: Path | None = None, timeout: float = 60.0
) -> Iterator[SimFleet]:
    """A sim-worker process hosting `count` workers of `role`; extra flags in `args`."""
    with tempfile.TemporaryDirectory(prefix="simfleet-") as tmp:
        ready_file = Path(tmp) / "ready.json"
        log = log or Path(tmp) / "sim.log"
        argv = [sys.executable, "-m", "bench.sim.main", "--role", role, "--count", str(count),
                "--ready-file", str(ready_file), *args]  # fmt: skip
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        fleet = SimFleet(proc, log, {})
        try:
            deadline = time.monotonic() + timeout
            while not ready_file.exists():
                if proc.poll() is not None:
                    raise RuntimeError(f"sim-worker exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sim-worker not ready in {timeout}s:\n{log.read_text()[-3000:]}")
                time.sleep(0.05)
            fleet.ready = orjson.loads(ready_file.read_bytes())
            fleet.workers = list(fleet.ready["workers"])
            yield fleet
        finally:
            stop(proc)
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if "CPU per request" in ln]
            fleet.summary = lines[-1] if lines else ""


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM the process (its own session), SIGKILL it if it does not exit in time."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
