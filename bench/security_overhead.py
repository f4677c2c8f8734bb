"""What API keys and rate limits add to a request at the router (docs/security.md).

Three router processes (`python -m services.router.main`) side by side, the same model, static
worker addresses nobody serves (the request measured, GET /v1/models, never reaches a worker):

    off      no keys
    keys     --api-keys FILE (a key without limits: the check is a SHA-256 and a dict read)
    limits   --api-keys-redis on a real redis-server, the key with rpm/tpm set: one Lua script
             call in Redis per request on top

One client, sequential requests on a kept-alive connection, the three routers interleaved
request by request (so that other load on the machine falls on all three alike). Reported: p50
latency and router CPU a request (the router process's CPU time from /proc over the requests),
each as a ratio to `off` from the same run.

    python bench/security_overhead.py [--requests 2000] [--quick]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.common.api_keys import FileKeyStore, RedisKeyStore
from services.common.netutil import free_port, port_open
from services.common.redis_server import RedisServer
from services.models.model_store import resolve_model

ROOT = Path(__file__).resolve().parents[1]


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_router(model: Path, extra: list[str]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    argv = [sys.executable, "-m", "services.router.main", "--port", str(port), "--model", str(model),
            "--prefill", "127.0.0.1:1", "--decode", "127.0.0.1:2", "--log-level", "warning", *extra]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not port_open("127.0.0.1", port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("router did not start")
        time.sleep(0.1)
    return proc, port


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--quick", action="store_true", help="300 requests a router (well under a minute)")
    args = p.parse_args()
    if args.quick:
        args.requests = min(args.requests, 300)
    model = resolve_model("smollm2")
    with RedisServer() as redis, tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "keys.json"
        file_key, _ = FileKeyStore(key_file).add("bench")
        redis_key, _ = RedisKeyStore(redis.url).add("bench", rpm=10**9, tpm=10**12)
        setups = {
            "off": ([], ""),
            "keys": (["--api-keys", str(key_file)], file_key),
            "limits": (["--api-keys-redis", redis.url], redis_key),
        }
        procs = {name: start_router(model, extra) for name, (extra, _) in setups.items()}
        try:
            conns = {name: http.client.HTTPConnection("127.0.0.1", port) for name, (_, port) in procs.items()}
            headers = {name: {"Authorization": f"Bearer {k}"} if k else {} for name, (_, k) in setups.items()}
            lat: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(50):  # warm up
                for name, c in conns.items():
                    c.request("GET", "/v1/models", headers=headers[name])
                    assert c.getresponse().read() and True
            cpu0 = {name: cpu_s(proc.pid) for name, (proc, _) in procs.items()}
            for _ in range(args.requests):
                for name, c in conns.items():
                    t = time.perf_counter()
                    c.request("GET", "/v1/models", headers=headers[name])
                    r = c.getresponse()
                    r.read()
                    lat[name].append(time.perf_counter() - t)
                    assert r.status == 200, (name, r.status)
            cpu = {name: (cpu_s(proc.pid) - cpu0[name]) / args.requests for name, (proc, _) in procs.items()}
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)
    base_p50, base_cpu = statistics.median(lat["off"]), cpu["off"]
    print(f"GET /v1/models, {args.requests} requests a router, interleaved (one client)")
    print(f"{'setup':<8} {'p50 ms':>8} {'x off':>7} {'CPU ms/req':>11} {'x off':>7}")
    for name in setups:
        p50 = statistics.median(lat[name])
        print(
            f"{name:<8} {p50 * 1e3:8.3f} {p50 / base_p50:7.2f} {cpu[name] * 1e3:11.3f} {cpu[name] / base_cpu:7.2f}"
        )


if __name__ == "__main__":
    main()
