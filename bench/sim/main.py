"""`swaserve sim-worker --role prefill|decode|both [--count N] ...`: SIMULATED workers for benchmarks.

Same APIs as the real workers (gRPC prefill / decode, registered in Redis; or, role `both`, the
HTTP API sglang-router and vllm-router expect), the engine's real scheduler, radix cache and KV
pools as bookkeeping, and time from a cost model of MiMo-V2-Flash on 8 x H200 (bench/sim/
cost_model.py). `--count N` hosts N independent workers in this process, on ports P, P+1, ...
(P = --port, or --http-port for `both`; 0: any free ports). Also `python -m bench.sim.main`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.sim.cost_model import KV_LINK_GBPS, CostModel
from bench.sim.engine import SimEngineConfig
from bench.sim.stats import SimStats
from bench.sim.worker import ROLES, SimWorker, SimWorkerConfig

log = logging.getLogger("swaserve.sim")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swaserve sim-worker", description=__doc__)
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--count", type=int, default=1, help="independent workers hosted by this process")
    p.add_argument("--model", default="mimo-tiny", help="model name registered and served (routers match it)")
    p.add_argument("--host", default="127.0.0.1", help="address the servers bind")
    p.add_argument(
        "--port", type=int, default=0, help="first port (gRPC roles; `both` too without --http-port)"
    )
    p.add_argument("--http-port", type=int, default=None, help="first HTTP port (role both)")
    p.add_argument(
        "--advertise-host", default=os.environ.get("SWASERVE_ADVERTISE_HOST") or "127.0.0.1",
        help="host other services dial, as registered in Redis",
    )  # fmt: skip
    p.add_argument(
        "--redis-url", default="", help="Redis for discovery and KV events; empty: do not register"
    )
    p.add_argument("--heartbeat-ttl", type=float, default=6.0, help="registry TTL, seconds")
    p.add_argument(
        "--bucket", default="", help="prefill: the prompt-length pool (a router --length-buckets name)"
    )
    p.add_argument("--no-kv-events", action="store_true", help="prefill: do not publish KV cache events")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--window", type=int, default=128, help="SWA window (previous tokens an SWA query sees)")
    p.add_argument(
        "--max-total-tokens", type=int, default=1 << 20, help="KV capacity of the full pool, tokens"
    )
    p.add_argument(
        "--swa-pages", type=int, default=None, help="SWA pool pages (default: 2 windows per running slot)"
    )
    p.add_argument("--chunk-size", type=int, default=16384)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument(
        "--queue-policy", choices=["fcfs", "uncached-first"], default=None,
        help="default: uncached-first for prefill (as the real prefill worker), fcfs for both",
    )  # fmt: skip
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument("--max-context", type=int, default=262_144)
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="divide every simulated service time by this"
    )
    p.add_argument("--kv-link-gbps", type=float, default=KV_LINK_GBPS, help="KV transfer link, Gbit/s")
    p.add_argument("--reserve-ttl", type=float, default=30.0, help="decode: seconds a reservation lives")
    p.add_argument("--ready-file", default="", help="write the workers' addresses here (JSON) once all serve")
    p.add_argument("--log-level", default="INFO")
    return p


def configs(args: argparse.Namespace) -> list[SimWorkerConfig]:
    if args.count < 1:
        raise ValueError("--count must be >= 1")
    policy = args.queue_policy or ("uncached-first" if args.role == "prefill" else "fcfs")
    engine = SimEngineConfig(
        page_size=args.page_size, window=args.window, max_total_tokens=args.max_total_tokens,
        swa_pages=args.swa_pages, chunk_size=args.chunk_size, max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running, queue_policy=policy, enable_prefix_cache=not args.no_prefix_cache,
        max_context=args.max_context,
    )  # fmt: skip
    cost = CostModel(time_scale=args.time_scale, kv_link_bytes_per_s=args.kv_link_gbps * 1e9 / 8)
    base = args.http_port if args.role == "both" and args.http_port is not None else args.port
    one = SimWorkerConfig(
        role=args.role, model=args.model, engine=engine, cost=cost, host=args.host,
        advertise_host=args.advertise_host, redis_url=args.redis_url, heartbeat_ttl=args.heartbeat_ttl,
        bucket=args.bucket, kv_events=not args.no_kv_events, reserve_ttl=args.reserve_ttl,
    )  # fmt: skip
    return [dataclasses.replace(one, port=base + i if base else 0) for i in range(args.count)]


async def serve(cfgs: Sequence[SimWorkerConfig], stats: SimStats, ready_file: str = "") -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers: list[SimWorker] = []
    try:
        for cfg in cfgs:
            workers.append(await SimWorker(cfg, stats).start())
        cost, first = cfgs[0].cost, cfgs[0]
        print(
            f"swaserve sim-worker: {len(workers)} SIMULATED {first.role} worker(s) ready on "
            f"{', '.join(w.url for w in workers)} (model {first.model}, time scale {cost.time_scale:g}; "
            f"cost model MiMo-V2-Flash on 8 x H200: prefill {cost.prefill_tokens_per_s():,.0f} tokens/s "
            f"at 2k, decode {1 / cost.decode_tpot_s:.0f} tokens/s per request, simulated time)",
            file=sys.stderr,
            flush=True,
        )
        if ready_file:
            body = {"simulated": True, "role": first.role, "workers": [w.url for w in workers],
                    "worker_ids": [w.worker_id for w in workers], "pid": os.getpid()}  # fmt: skip
            tmp = Path(ready_file).with_suffix(".tmp")
            tmp.write_text(json.dumps(body))
            tmp.replace(ready_file)
        await stop.wait()
    finally:
        results = await asyncio.gather(*(w.stop() for w in workers), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("stopping a simulated worker failed: %r", r)
        print(stats.summary(), file=sys.stderr, flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s sim-worker (SIMULATED) %(levelname)s %(name)s: %(message)s",
    )
    try:
        cfgs = configs(args)
    except ValueError as e:
        print(f"swaserve sim-worker: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(serve(cfgs, SimStats(), args.ready_file))


if __name__ == "__main__":
    raise SystemExit(main())
