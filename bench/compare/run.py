"""One run: a fresh fleet, one replay of the trace slice through it, its figures and CPU times.

The replay is `python -m bench.replay.main ... --json FILE --detailed` in a child process, so its
CPU (the load generator's) is measured apart from the router's and the fleet's. CPU is read from
/proc just before and after the replay (fleet start-up is not counted) and divided by the
requests sent.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.compare import accuracy
from bench.compare.fleet import (
    Fleet,
    FleetSpec,
    Policy,
    machine_busy_seconds,
    session_cpu_seconds,
    start_fleet,
)
from bench.sim.stats import process_cpu_seconds


@dataclass(frozen=True)
class Workload:
    trace: Path
    start_s: float
    duration_s: float
    rate_scale: float
    time_scale: float
    max_output: int = 8
    prompt_scale: float = 1.0
    seed: int = 1
    limit: int | None = None
    prompt_blocks: str = "continue"  # bench.replay --prompt-blocks: turns continue earlier prompts

    @property
    def trace_name(self) -> str:
        return self.trace.stem.removesuffix("_trace")

    def replay_argv(self, fleet: Fleet, json_path: Path) -> list[str]:
        argv = [sys.executable, "-m", "bench.replay.main", "--trace", str(self.trace),
                "--start", f"{self.start_s:g}", "--duration", f"{self.duration_s:g}",
                "--prompt-scale", f"{self.prompt_scale:g}", "--max-output", str(self.max_output),
                "--rate-scale", f"{self.rate_scale:g}", "--time-scale", f"{self.time_scale:g}",
                "--target", ",".join(fleet.targets), "--model", fleet.model, "--prompt-mode", fleet.prompt_mode,
                "--seed", str(self.seed), "--prompt-blocks", self.prompt_blocks,
                "--json", str(json_path), "--detailed", "--no-progress"]  # fmt: skip
        return argv + (["--limit", str(self.limit)] if self.limit else [])


@dataclass(frozen=True)
class RunSpec:
    policy: Policy
    workload: Workload
    fleet: FleetSpec

    @property
    def key(self) -> str:
        w, f = self.workload, self.fleet
        qp = f"-{f.queue_policy}" if f.queue_policy else ""
        pb = "" if w.prompt_blocks == "continue" else f"-{w.prompt_blocks}"
        ch = f"-chunk{f.chunk_size}" if f.chunk_size else ""
        rep = f"-r{f.router_replicas}" if f.router_replicas > 1 else ""
        return (
            f"{w.trace_name}-w{f.workers}-x{w.rate_scale:g}-win{f.window}{pb}{ch}-{self.policy.name}{qp}{rep}"
        )


def _replay(argv: list[str], log: Path, timeout: float) -> tuple[int, float, float]:
    """Run the replay; (exit code, its CPU seconds, wall seconds)."""
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = t0 + timeout
    try:
        while True:  # wait4 gives the child's rusage; poll it so that a hung replay is killed
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_utime + usage.ru_stime, time.monotonic() - t0
            if time.monotonic() > deadline:
                raise TimeoutError(f"replay did not finish in {timeout:.0f}s (log {log})")
            time.sleep(0.1)
    finally:  # a timeout, or the harness interrupted: no replay left behind
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class BacklogSampler(threading.Thread):
    """Every `interval` s, each prefill worker's backlog (tokens queued or in prefill), during the replay.

    imbalance = sum over samples of the busiest worker's backlog / sum of the mean backlog: 1 when
    every worker always holds the same work, N (the worker count) when one worker holds all of it."""

    def __init__(self, fleet: Fleet, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.fleet, self.interval = fleet, interval
        self.samples: list[list[int]] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.samples.append(self.fleet.backlogs())
            except Exception:  # a missed sample is no reason to fail the run
                self.errors += 1

    def stop(self) -> dict[str, Any]:
        self._halt.set()
        self.join(timeout=10)
        return backlog_figures(self.samples) | {"backlog_sample_errors": self.errors}


def backlog_figures(samples: list[list[int]]) -> dict[str, Any]:
    """Averages over the samples in which some worker had a backlog (idle instants say nothing)."""
    busy = [s for s in samples if s and sum(s) > 0]
    mean = sum(sum(s) / len(s) for s in busy)
    return {
        "backlog_samples": len(samples),
        "backlog_busy_samples": len(busy),
        "backlog_mean_tokens": mean / len(busy) if busy else 0.0,
        "backlog_max_tokens": sum(max(s) for s in busy) / len(busy) if busy else 0.0,
        "backlog_imbalance": sum(max(s) for s in busy) / mean if mean else None,
    }


def _decisions(bases: list[str]) -> dict[str, float]:
    """Our router's decisions by reason (cache_hit, load_over_cache, cache_miss, ...), over its replicas."""
    out: dict[str, float] = {}
    for base in bases:
        text = httpx.get(f"{base}/metrics", timeout=5).text
        found = re.findall(r'^swaserve_router_decisions_total\{reason="(\w+)"\} ([0-9.e+]+)$', text, re.M)
        for k, v in found:
            out[k] = out.get(k, 0.0) + float(v)
    return out


def execute(run: RunSpec, out_dir: Path, attempt: int = 0, timeout: float = 3600.0) -> dict[str, Any]:
    """Start the fleet, replay, stop everything; the run's summary (figures + CPU) as a dict.
    Logs and the replay's JSON go to out_dir/runs/KEY (KEY.N for attempt N > 0)."""
    rundir = out_dir / "runs" / (run.key + (f".{attempt}" if attempt else ""))
    rundir.mkdir(parents=True, exist_ok=True)
    json_path = rundir / "replay.json"
    json_path.unlink(missing_ok=True)
    with start_fleet(run.policy, run.fleet, rundir) as fleet:
        r0, f0 = session_cpu_seconds(fleet.router_pids), session_cpu_seconds(fleet.fleet_pids)
        m0, h0 = machine_busy_seconds(), process_cpu_seconds()
        argv = run.workload.replay_argv(fleet, json_path)
        sampler = BacklogSampler(fleet)
        sampler.start()
        try:
            code, client_cpu, wall = _replay(argv, rundir / "replay.log", timeout)
        finally:
            backlog = sampler.stop()
        r1, f1 = session_cpu_seconds(fleet.router_pids), session_cpu_seconds(fleet.fleet_pids)
        m1, h1 = machine_busy_seconds(), process_cpu_seconds()
        ours = run.policy.router == "swaserve"
        decisions = _decisions(fleet.targets) if ours else {}
        predicted = accuracy.scrape(fleet.targets) if ours else None  # bench/compare/accuracy.py
    if code != 0 or not json_path.exists():
        tail = (rundir / "replay.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"replay of {run.key} failed (exit {code}):\n{tail}")
    data = json.loads(json_path.read_text())
    # everything else the machine did meanwhile: other jobs (and kernel networking billed to no one)
    other = (m1 - m0) - (r1 - r0) - (f1 - f0) - client_cpu - (h1 - h0)
    backlog["other_cpu_cores"] = other / wall if wall > 0 else None
    return (
        summarize(run, data, router_cpu=r1 - r0, fleet_cpu=f1 - f0, client_cpu=client_cpu, wall=wall)
        | backlog
        | {
            "decisions": decisions,
            "accuracy": predicted,
            "replay_json": str(json_path),
            "pids": {"router": fleet.router_pids, "fleet": fleet.fleet_pids},  # all stopped by now
        }
    )


def summarize(
    run: RunSpec, data: dict[str, Any], *, router_cpu: float, fleet_cpu: float, client_cpu: float, wall: float
) -> dict[str, Any]:
    """The figures the table and the plots use, from the replay's JSON and the CPU readings."""
    n = max(1, int(data["sent"]))
    setup = data["setup"]
    span = (setup["last_arrival_s"] - setup["first_arrival_s"]) / run.workload.rate_scale
    return {
        "key": run.key,
        "policy": run.policy.name,
        "router": run.policy.router,
        "trace": run.workload.trace_name,
        "workers": run.fleet.workers,
        "router_replicas": run.fleet.router_replicas,
        "queue_policy": run.fleet.queue_policy
        or ("uncached-first" if run.policy.router == "swaserve" else "fcfs"),
        "workload": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(run.workload).items()},
        "sent": data["sent"],
        "completed": data["completed"],
        "failed": data["failed"],
        "errors": data["errors"],
        "offered_rate": data["sent"] / span if span > 0 else None,  # req/s of trace time, after rate scale
        "hit_rate": data["measured_hit_rate"],
        "ideal_hit_rate": data["ideal_hit_rate"],
        "hit_ratio": data["hit_rate_ratio"],
        "mean_ttft_ms": data["mean_ttft_ms"],
        "median_ttft_ms": data["median_ttft_ms"],
        "p90_ttft_ms": data["p90_ttft_ms"],
        "p99_ttft_ms": data["p99_ttft_ms"],
        "min_ttft_ms": min((r["ttft_ms"] for r in data.get("requests", ()) if r["ok"]), default=None),
        "request_throughput": data["request_throughput"],
        "input_throughput": data["input_throughput"],
        "max_send_delay_ms": data["max_send_delay_ms"],
        "wall_s": wall,
        "router_cpu_ms_per_req": 1000 * router_cpu / n,
        "router_core_util": router_cpu / wall if wall > 0 else None,
        "fleet_cpu_ms_per_req": 1000 * fleet_cpu / n,
        "fleet_core_util": fleet_cpu / wall if wall > 0 else None,
        "client_cpu_ms_per_req": 1000 * client_cpu / n,
        "client_core_util": client_cpu / wall if wall > 0 else None,
    }
