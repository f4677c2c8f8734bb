"""Our router's CPU per request on long prompts, steadier than a trace replay (SIMULATED workers).

    .venv/bin/python bench/router_cpu.py [--prompt-tokens 85000] [--requests 40] [--sessions 4] [--rounds 1] [--quick]

A fresh fleet (bench/compare/fleet.py: redis-server, 8 simulated prefill workers and 2 decode
workers, our router with the seed policy), then `--requests` sequential completions as token ids:
`--sessions` conversations taking turns, each turn the previous prompt plus 200-2,000 new tokens
(the shape of bench/replay/agentic.py's tool sessions, without its arrival times). Printed: the
router process's CPU time over the requests / their number (all threads, /proc), the same less
what the router spends idle (measured for 3 s after the last request), and each thread's share
(named when py-spy is installed). Sequential requests on a warm fleet move less with the machine's
load than a replay does; bench/compare_routers.py --agentic (or --trace A.jsonl) gives the ratio
to sglang-router on the same prompts, the goal's measure (bench/RESULTS.md).

Run from another checkout to compare two versions of the router: the router runs from the working
directory's `services`.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.compare.fleet import POLICIES, FleetSpec, start_fleet  # noqa: E402
from bench.proc_cpu import cpu_seconds  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")  # /proc/*/stat ticks per second


def thread_ticks(pid: int) -> dict[str, int]:
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            st = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[t.name] = int(st[11]) + int(st[12])
    return out


def thread_names(pid: int) -> dict[str, str]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return {}
    dump = subprocess.run([spy, "dump", "-p", str(pid)], capture_output=True, text=True).stdout
    return dict(re.findall(r'Thread (\d+) \((?:idle|active)\): "([^"]+)"', dump))


def one_round(args: argparse.Namespace, logdir: Path) -> float:
    rng = random.Random(args.seed)
    prompts = [[rng.randrange(1, 150_000) for _ in range(args.prompt_tokens)] for _ in range(args.sessions)]
    spec = FleetSpec(workers=args.workers, time_scale=args.time_scale, window=args.window)
    with start_fleet(POLICIES["swaserve-seed"], spec, logdir) as fleet:
        pid = fleet.router_pids[0]
        host, port = fleet.targets[0].split("//")[1].split(":")

        def send(ids: list[int]) -> None:
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            body = orjson.dumps({"model": fleet.model, "prompt": ids, "max_tokens": 4, "stream": True,
                                 "stream_options": {"include_usage": True}})  # fmt: skip
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            if resp.status != 200:
                raise RuntimeError(f"router answered {resp.status}: {data[:300]!r}")

        send(prompts[0][:100])  # warm: connections, first decision
        time.sleep(1.0)
        k0, c0, t0 = thread_ticks(pid), cpu_seconds(pid), time.monotonic()
        for i in range(args.requests):
            s = i % args.sessions
            prompts[s] += [rng.randrange(1, 150_000) for _ in range(rng.randrange(200, 2001))]
            send(prompts[s])
        k1, c1, t1 = thread_ticks(pid), cpu_seconds(pid), time.monotonic()
        time.sleep(3.0)
        idle = (cpu_seconds(pid) - c1) / (time.monotonic() - t1)
        names = thread_names(pid)
    per_req = (c1 - c0) / args.requests * 1e3
    busy = ((c1 - c0) - idle * (t1 - t0)) / args.requests * 1e3
    threads = sorted(((k1[t] - k0.get(t, 0), names.get(t, t)) for t in k1), reverse=True)
    shares = ", ".join(
        f"{name} {ticks / _TICK / args.requests * 1e3:.1f}" for ticks, name in threads if ticks
    )
    print(f"router CPU {per_req:.2f} ms/request ({busy:.2f} less idle {idle * 100:.1f}% of a core); "
          f"by thread, ms/request: {shares}", flush=True)  # fmt: skip
    return per_req


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-tokens", type=int, default=85_000, help="each session's first prompt")
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--rounds", type=int, default=1, help="fresh fleets, one after the other")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--window", type=int, default=0, help="the sims' cache window")
    p.add_argument("--time-scale", type=float, default=16.0, help="sim service times / this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="16 requests (well under a minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 16)
    if args.prompt_tokens < 1 or args.requests < 1 or args.sessions < 1:
        p.error("--prompt-tokens, --requests and --sessions must be >= 1")
    figures = []
    with tempfile.TemporaryDirectory(prefix="router-cpu-") as tmp:
        for r in range(args.rounds):
            figures.append(one_round(args, Path(tmp) / f"round{r}"))
    if len(figures) > 1:
        print(f"median over {len(figures)} rounds: {statistics.median(figures):.2f} ms/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
