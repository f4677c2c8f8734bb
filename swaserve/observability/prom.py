"""A Prometheus server (Debian's `prometheus` binary) on loopback, scraping swaserve's /metrics, and a
small client for its HTTP API.

`PrometheusServer` writes prometheus.yml (one job a service, one target a process, the process's
name as label `worker`; swaserve's recording rules and alerts loaded), starts the binary on a free
127.0.0.1 port with its data in the run directory, and waits for /-/ready. Used by
`swaserve up --prometheus`, `swaserve dashboards render` and tests/observability.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.netutil import free_port

RULES = Path(__file__).resolve().with_name("rules.yml")


class PrometheusNotInstalled(RuntimeError):
    pass


@dataclass(frozen=True)
class ScrapeTarget:
    job: str  # router, prefill, decode, gcache
    address: str  # host:port serving /metrics
    labels: dict[str, str] = field(default_factory=dict)


def config_text(targets: Sequence[ScrapeTarget], interval: str, rules: Path | None) -> str:
    """prometheus.yml as JSON (a YAML subset), jobs in first-seen order."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        jobs.setdefault(t.job, []).append({"targets": [t.address], "labels": dict(t.labels)})
    cfg: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": job, "scrape_interval": interval, "static_configs": statics}
            for job, statics in jobs.items()
        ],
    }
    if rules is not None:
        cfg["rule_files"] = [str(rules)]
    return json.dumps(cfg, indent=2) + "\n"


class PrometheusServer:
    def __init__(
        self,
        targets: Sequence[ScrapeTarget],
        run_dir: Path,
        *,
        interval: str = "1s",
        port: int = 0,
        rules: Path | None = RULES,
        wrapper: Sequence[str] = (),
        binary: str = "prometheus",
    ) -> None:
        if not targets:
            raise ValueError("Prometheus needs at least one scrape target")
        self.targets, self.run_dir, self.interval = list(targets), Path(run_dir), interval
        self.port, self.rules, self.wrapper, self.binary = port, rules, list(wrapper), binary
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> PrometheusServer:
        exe = shutil.which(self.binary)
        if exe is None:
            raise PrometheusNotInstalled(
                "prometheus is not installed: apt-get install --no-install-recommends prometheus "
                "(scripts/setup.sh does it)"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / "prometheus.yml"
        config.write_text(config_text(self.targets, self.interval, self.rules))
        self.port = self.port or free_port()
        argv = [
            *self.wrapper, exe, f"--config.file={config}", f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
        ]  # fmt: skip
        log = (self.run_dir / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (self.run_dir / "prometheus.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"prometheus not ready on {self.url} within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PromAPIError(RuntimeError):
    pass


@dataclass(frozen=True)
class Series:
    labels: dict[str, str]
    points: list[tuple[float, float]]  # (unix time, value); one point for an instant query

    @property
    def finite(self) -> bool:
        return any(math.isfinite(v) for _, v in self.points)


def _get(base: str, path: str, params: dict[str, str], timeout: float) -> Any:
    url = f"{base.rstrip('/')}{path}?{urllib.parse.urlencode(params)}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body = json.loads(r.read())
    except urllib.error.HTTPError as e:  # 400/422 carry the error text
        body = json.loads(e.read() or b"{}")
    if body.get("status") != "success":
        raise PromAPIError(f"{params.get('query', '')!r}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]


def query(base: str, expr: str, at: float | None = None, timeout: float = 10.0) -> list[Series]:
    """An instant query: one series per result element (a scalar result is one unlabelled series)."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    data = _get(base, "/api/v1/query", params, timeout)
    if data["resultType"] == "scalar":
        return [Series({}, [(float(data["result"][0]), float(data["result"][1]))])]
    return [Series(r["metric"], [(float(r["value"][0]), float(r["value"][1]))]) for r in data["result"]]


def query_range(
    base: str, expr: str, start: float, end: float, step: float, timeout: float = 30.0
) -> list[Series]:
    params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
    data = _get(base, "/api/v1/query_range", params, timeout)
    return [Series(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]


def targets_up(base: str) -> dict[str, float]:
    """`up` per target (job/worker) as Prometheus last scraped it."""
    return {f"{s.labels.get('job')}/{s.labels.get('worker', s.labels.get('instance'))}": s.points[0][1]
            for s in query(base, "up")}  # fmt: skip
