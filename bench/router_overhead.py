"""Router overhead: how long one routing decision takes, and what the router adds to a request.

Setup: a real redis-server holding 64 registered prefill workers (plus 16 decode) with loads, and a
prefix index holding 256 conversations of 30k tokens spread over the workers (SWA kept only at each
conversation's end, as the radix cache retains it), plus a 2k-token system prompt every worker holds.
Requests are 32k-token prompts (page 64: 512 blocks): half continue a conversation (a ~30k window-safe
hit on one worker), half are new (only the system prompt hits, on every worker).

  decision   in-process, one thread: prepare the prompt (its key; pages are hashed as the index
             match reads them, services/router/page_hashes.py), read the candidates from the
             Redis-backed pool's snapshot, index match, filters, scorers, picker. p50 / p99 and
             decisions/s (= 1 / mean latency of one thread).
  HTTP       the router as a process (`python -m services.router.main`), FAKE workers (another
             process, one gRPC server answering Reserve / Prefill instantly, 80 ports) vs calling a
             fake worker's Prefill directly over gRPC; one client, sequential requests, the kinds
             interleaved, request bodies encoded once up front. The router is asked through the
             stdlib http.client (httpx, ~0.3 ms slower on its own side, shown for reference).
             "adds" = router p50 - direct p50, direct = the prompt packed (`prompt_ids_packed`,
             what the router sends too). "router CPU" =
             the router process's CPU time (all threads, /proc) over the requests / their number:
             steadier than latency when other processes compete for the cores. The router
             follows the same prefix index through KV events in Redis (the cluster's state
             published by one KVEventPublisher per worker), so its decisions are cache-aware as in
             the decision bench (`--router-index empty`: an empty index, every request a miss).

Goals: decision p99 <= 2 ms; HTTP adds <= 3 ms p50. Absolute milliseconds differ ~2x between machines
of one kind, so the table's last column also gives each figure over the direct gRPC Prefill's p50
(same prompt length, same run): a router that adds 1.0x adds as much as the call it routes. The index is services.common.prefix_index when
importable, else the tests' FakePrefixIndex (the table says which).

    python bench/router_overhead.py [--quick] [--workers 64] [--prompt-tokens 32768] [--page-size 64]
                                    [--router-index events|empty]
"""

from __future__ import annotations

import argparse
import array
import http.client
import json
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.proc_cpu import cpu_seconds  # noqa: E402
from services.common.block_hash import hash_blocks  # noqa: E402
from services.common.prompt_wire import pack_ids  # noqa: E402
from services.common.redis_server import RedisServer  # noqa: E402
from services.common.registry import WorkerRecord, WorkerRegistry  # noqa: E402
from services.proto_gen import worker_pb2, worker_pb2_grpc  # noqa: E402
from services.router.discovery import RedisWorkerPool  # noqa: E402
from services.router.policy import PolicyConfig  # noqa: E402
from services.router.routing import CandidateSource, RoutingPipeline  # noqa: E402

MODEL = "smollm2"
WINDOW = 128
SYSTEM_TOKENS = 2048
CONV_TOKENS = 30 * 1024


# -- fake workers (a child process) ---------------------------------------------------------------
class InstantWorker(worker_pb2_grpc.PrefillWorkerServicer, worker_pb2_grpc.DecodeWorkerServicer):
    def Prefill(self, request: Any, context: Any) -> Any:
        return worker_pb2.PrefillReply(
            rid=request.rid, first_token=1, first_logprob=-0.1, finish_reason="length"
        )

    def Reserve(self, request: Any, context: Any) -> Any:
        return worker_pb2.ReserveReply(ok=True)

    def Abort(self, request: Any, context: Any) -> Any:
        return worker_pb2.AbortReply(found=True)

    def Health(self, request: Any, context: Any) -> Any:
        return worker_pb2.HealthReply(role="prefill", model=MODEL, ready=True)


def serve_fake_workers(n_ports: int) -> None:
    opts = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=opts)
    w = InstantWorker()
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(w, server)
    worker_pb2_grpc.add_DecodeWorkerServicer_to_server(w, server)
    ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(n_ports)]
    server.start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


# -- the cluster state ----------------------------------------------------------------------------
def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1, 49_000) for _ in range(n)]


def make_index(page: int) -> tuple[Any, str]:
    try:
        from services.common.prefix_index import PrefixIndex

        return PrefixIndex(page, WINDOW), "services.common.prefix_index"
    except ImportError:
        from tests.router.fake_index import FakePrefixIndex

        return FakePrefixIndex(page, WINDOW), "FAKE test index (prefix_index not importable)"


def put(index: Any, worker: str, full: list[Any], swa: list[Any]) -> None:
    if hasattr(index, "tombstone"):  # the test double
        index.store(worker, full)
        index.tombstone(worker, set(full) - set(swa))
    else:
        index.store(worker, "full", full)
        index.store(worker, "swa", swa)


class Cluster:
    def __init__(self, args: argparse.Namespace, redis_url: str, addrs: list[str]) -> None:
        rng = random.Random(0)
        page, n = args.page_size, args.workers
        self.index, self.index_name = make_index(page)
        need = -(-WINDOW // page)
        system = tokens(rng, SYSTEM_TOKENS)
        sys_hashes = hash_blocks(system, page)
        self.prefill = [f"prefill-{i}" for i in range(n)]
        self.convs: list[list[int]] = []
        self.kv: dict[str, tuple[set[Any], set[Any]]] = {}  # worker -> (full, swa): what it publishes
        for i in range(n):
            self._put(addrs[i], sys_hashes, sys_hashes[-need:])
        for c in range(args.conversations):
            conv = system + tokens(rng, CONV_TOKENS - SYSTEM_TOKENS)
            hashes = hash_blocks(conv, page)
            self._put(addrs[c % n], hashes, hashes[-need:])  # SWA kept at the prompt end only
            self.convs.append(conv)
        reg = WorkerRegistry(redis_url, ttl=3600)
        for i, addr in enumerate(addrs):
            role = "prefill" if i < n else "decode"
            rec = WorkerRecord(role=role, addr=addr, model=MODEL, capacity_tokens=1_000_000, updated_at=time.time(),
                               labels={"bucket": "short"}, running=rng.randrange(4), waiting=rng.randrange(4),
                               queued_tokens=rng.randrange(0, 65536),
                               free_kv_tokens=rng.randrange(100_000, 1_000_000))  # fmt: skip
            reg.redis.set(reg.key(role, rec.worker_id), rec.to_json(), ex=3600)
        self.system = system

    def _put(self, worker: str, full: list[Any], swa: list[Any]) -> None:
        put(self.index, worker, full, swa)
        f, s = self.kv.setdefault(worker, (set(), set()))
        f.update(full)
        s.update(swa)

    def publish(self, redis_url: str, page: int) -> list[Any]:
        """Every worker's blocks as KV events in Redis (one resync each), for a router to follow."""
        from services.common.kv_event_bus import KVEventPublisher

        def state(full: set[Any], swa: set[Any]) -> Callable[[], tuple[Iterable[Any], Iterable[Any]]]:
            return lambda: (full, swa)

        pubs = []
        for worker, (full, swa) in self.kv.items():
            pub = KVEventPublisher(redis_url, worker, page, WINDOW, snapshot_fn=state(full, swa), ttl=3600)
            pub.publish([])  # the first publish writes the whole state
            pubs.append(pub)
        for pub in pubs:
            if not pub.flush(timeout=60):
                raise SystemExit("KV events were not written to Redis")
        return pubs

    def prompts(self, rng: random.Random, count: int, length: int) -> list[list[int]]:
        out = []
        for i in range(count):
            if i % 2 == 0:  # the next turn of a conversation
                base = self.convs[rng.randrange(len(self.convs))]
                out.append(base + tokens(rng, length - len(base)))
            else:
                out.append(self.system + tokens(rng, length - len(self.system)))
        return out


class Source:
    def __init__(self, index: Any) -> None:
        self.index, self.ready, self.redis_ok = index, True, True


# -- measurements ---------------------------------------------------------------------------------
def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def bench_decisions(args: argparse.Namespace, cluster: Cluster, redis_url: str) -> dict[str, Any]:
    cfg = PolicyConfig(page_size=args.page_size, window=WINDOW)
    pipe = RoutingPipeline(cfg, Source(cluster.index))
    pool = RedisWorkerPool(redis_url, model=MODEL, refresh_s=0.5)
    candidates = CandidateSource(pool)  # as the dispatcher reads them
    rng = random.Random(1)
    # as the router holds a prompt: an array("I") (services/router/prompts.py)
    prompts = [array.array("I", p) for p in cluster.prompts(rng, args.decisions, args.prompt_tokens)]
    total: list[float] = []
    phases: dict[str, list[float]] = {"prepare": [], "candidates": [], "hash+match+score+pick": []}
    reasons: dict[str, int] = {}
    by_kind: dict[str, list[float]] = {"next turn": [], "new": []}
    try:
        for i, ids in enumerate(prompts * 2):
            t0 = time.perf_counter()
            p = pipe.prepare(ids)
            t1 = time.perf_counter()
            pre, dec = candidates("prefill"), candidates("decode")
            t2 = time.perf_counter()
            d = pipe.decide(p, pre, dec, max_tokens=256)
            t3 = time.perf_counter()
            if i < len(prompts):
                continue  # the first pass warms up
            total.append(t3 - t0)
            by_kind["new" if i % 2 else "next turn"].append(t3 - t0)  # Cluster.prompts alternates them
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                phases[k].append(v)
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
    finally:
        pool.close()
    return {
        "total": total,
        "phases": phases,
        "reasons": reasons,
        "by_kind": by_kind,
        "n_prefill": len(pre),
        "n_decode": len(dec),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def prefill_request(rid: str, prompt: list[int], decode_addr: str) -> Any:
    sampling = worker_pb2.SamplingParams(max_tokens=1)
    return worker_pb2.PrefillRequest(rid=rid, prompt_ids_packed=pack_ids(prompt), decode_addr=decode_addr,
                                     sampling=sampling)  # fmt: skip


def timed_loop(h: Any, conn: http.client.HTTPConnection, stub: Any, bodies: list[bytes], direct: list[Any],
               n: int, warmup: int, router_pid: int) -> dict[str, Any]:  # fmt: skip
    """n rounds of: direct Prefill (the prompt packed), POST to the router with
    http.client, the same POST with httpx; in an order that rotates each round (what runs after
    a router request shares the machine with its background Abort)."""
    headers = {"content-type": "application/json"}
    out: dict[str, Any] = {
        "via": [],
        "via_httpx": [],
        "direct": [],
        "via_conv": [],
        "via_new": [],
    }

    def via(k: int) -> None:  # the stdlib client: ~0.3 ms less of its own time than httpx for 190 kB
        conn.request("POST", "/v1/completions", body=bodies[k], headers=headers)
        r = conn.getresponse()
        text = r.read()
        if r.status != 200:
            raise SystemExit(f"router answered {r.status}: {text[:300]!r}")

    def via_httpx(k: int) -> None:
        r = h.post("/v1/completions", content=bodies[k], headers=headers)
        if r.status_code != 200:
            raise SystemExit(f"router answered {r.status_code}: {r.text[:300]}")

    calls = {
        "direct": lambda k: stub.Prefill(direct[k], timeout=10),
        "via": via,
        "via_httpx": via_httpx,
    }
    names = list(calls)
    cpu0 = 0.0
    for i in range(n + warmup):
        if i == warmup:
            cpu0 = cpu_seconds(router_pid)
        for j in range(len(names)):
            name = names[(i + j) % len(names)]
            t0 = time.perf_counter()
            calls[name](i % len(bodies))
            if i >= warmup:
                out[name].append(time.perf_counter() - t0)
                if name == "via":  # Cluster.prompts: even ones continue a conversation, odd ones are new
                    out["via_new" if i % len(bodies) % 2 else "via_conv"].append(out["via"][-1])
    out["router_cpu"] = (cpu_seconds(router_pid) - cpu0) / (2 * n)  # two router requests a round
    return out


def bench_http(
    args: argparse.Namespace, cluster: Cluster, redis_url: str, ports: list[int]
) -> dict[str, Any]:
    import httpx

    port = free_port()
    publishers = cluster.publish(redis_url, args.page_size) if args.router_index == "events" else []
    cmd = [sys.executable, "-m", "services.router.main", "--port", str(port), "--model", MODEL,
           "--redis-url", redis_url, "--page-size", str(args.page_size), "--kv-window", str(WINDOW),
           "--max-context", str(args.prompt_tokens + 1024), "--log-level", "warning",
           "--prefix-index", "on"]  # fmt: skip
    router = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rng = random.Random(2)
    prompts = cluster.prompts(rng, 8, args.prompt_tokens)
    small = [p[:1024] for p in prompts]
    channel = grpc.insecure_channel(
        f"127.0.0.1:{ports[0]}", options=[("grpc.max_send_message_length", 1 << 26)]
    )
    stub = worker_pb2_grpc.PrefillWorkerStub(channel)
    decode_addr = f"127.0.0.1:{ports[-1]}"

    def requests(ps: list[list[int]]) -> tuple[list[bytes], list[Any]]:
        bodies = [json.dumps({"model": MODEL, "prompt": p, "max_tokens": 1}).encode() for p in ps]
        direct = [prefill_request(f"r{i}", p, decode_addr) for i, p in enumerate(ps)]
        return bodies, direct

    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as h:
            deadline = time.monotonic() + 120
            while True:
                try:
                    up = h.get("/health").json().get("prefill_workers") == args.workers
                    if up and (
                        not publishers or "swaserve_router_index_usable 1.0" in h.get("/metrics").text
                    ):
                        break
                except httpx.HTTPError:
                    pass
                if router.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the router did not come up")
                time.sleep(0.2)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            big = timed_loop(h, conn, stub, *requests(prompts), args.http_requests, 20, router.pid)
            reasons = decision_reasons(h.get("/metrics").text)
            short = timed_loop(h, conn, stub, *requests(small), args.http_requests, 20, router.pid)
            conn.close()
    finally:
        channel.close()
        router.terminate()
        router.wait(timeout=15)
        for pub in publishers:
            pub.close()
    big["reasons"] = reasons
    return {"32k": big, "1k": short}


def decision_reasons(metrics: str) -> dict[str, int]:
    """The router's decisions so far by reason (swaserve_router_decisions_total)."""
    out = {}
    for m in re.finditer(r'^swaserve_router_decisions_total\{reason="(\w+)"\} ([0-9.e+]+)$', metrics, re.M):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer decisions and requests (under a minute)")
    p.add_argument("--workers", type=int, default=64, help="registered prefill workers")
    p.add_argument("--decode-workers", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=32768)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--conversations", type=int, default=256)
    p.add_argument("--router-index", choices=["events", "empty"], default="events",
                   help="the router follows the cluster's prefix index (KV events in Redis), or none")  # fmt: skip
    p.add_argument("--serve-fake-workers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_fake_workers:
        serve_fake_workers(args.serve_fake_workers)
        return
    args.decisions = 200 if args.quick else 1000
    args.http_requests = 100 if args.quick else 400
    if args.quick:
        args.conversations = min(args.conversations, 128)
    n_ports = args.workers + args.decode_workers
    fakes = subprocess.Popen([sys.executable, __file__, "--serve-fake-workers", str(n_ports)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert fakes.stdout is not None and fakes.stdin is not None
    ports = json.loads(fakes.stdout.readline())
    addrs = [f"127.0.0.1:{port}" for port in ports]
    try:
        with RedisServer() as redis_server:
            t = time.perf_counter()
            cluster = Cluster(args, redis_server.url, addrs)
            print(f"index: {cluster.index_name}; {args.conversations} conversations over {args.workers} workers, "
                  f"built in {time.perf_counter() - t:.1f}s", flush=True)  # fmt: skip
            dec = bench_decisions(args, cluster, redis_server.url)
            http = bench_http(args, cluster, redis_server.url, ports)
    finally:
        fakes.stdin.close()
        fakes.wait(timeout=10)
    report(args, cluster, dec, http)


def report(args: argparse.Namespace, cluster: Cluster, dec: dict[str, Any], http: dict[str, Any]) -> None:
    """The table; its last column divides each p50 by the direct gRPC Prefill's p50 of the same prompt
    length in the same run (the decision by the first prompt length's), so that machines compare."""
    ms = 1e3
    tot = dec["total"]
    blocks = args.prompt_tokens // args.page_size
    print(f"\nreasons: {dec['reasons']}; candidates: {dec['n_prefill']} prefill, {dec['n_decode']} decode")
    print(
        "phase p50 (ms): "
        + ", ".join(f"{k} {statistics.median(v) * ms:.3f}" for k, v in dec["phases"].items())
    )
    print(
        "decision p50 (ms) by prompt: "
        + ", ".join(f"{k} {statistics.median(v) * ms:.3f}" for k, v in dec["by_kind"].items())
    )
    print(f"\n## Router overhead ({args.workers} prefill workers, {args.prompt_tokens}-token prompts = {blocks} "
          f"blocks of {args.page_size}; index: {cluster.index_name}; {os.cpu_count()} cores; "
          f"load average {os.getloadavg()[0]:.1f})")  # fmt: skip
    print("| measurement | p50 ms | p99 ms | per s | goal | met | p50 / direct p50 |")
    print("|---|---|---|---|---|---|---|")
    first = statistics.median(next(iter(http.values()))["direct"])
    p99 = pct(tot, 0.99)
    print(f"| decision (hash + candidates + match + score + pick), n={len(tot)} | {statistics.median(tot) * ms:.3f} "
          f"| {p99 * ms:.3f} | {1 / statistics.mean(tot):,.0f} | p99 <= 2 ms | {'yes' if p99 <= 0.002 else 'NO'} "
          f"| {statistics.median(tot) / first:.2f} (p99 {p99 / first:.2f}) |")  # fmt: skip
    if "reasons" in http["32k"]:
        print(f"router's decisions over HTTP (32k): {http['32k']['reasons']}")
    for label, run in http.items():
        via, direct = run["via"], run["direct"]
        v50, d50 = statistics.median(via), statistics.median(direct)
        added = v50 - d50
        ratio = {k: statistics.median(run[k]) / d50 for k in ("via", "via_httpx")}
        print(f"| direct gRPC Prefill to a fake worker, {label} prompt packed | {d50 * ms:.2f} "
              f"| {pct(direct, 0.99) * ms:.2f} | {1 / statistics.mean(direct):,.0f} | | | 1 |")  # fmt: skip
        goal = "<= 3 ms" if label == "32k" else ""
        met = ("yes" if added <= 0.003 else "NO") if goal else ""
        print(f"| via router HTTP (Reserve + Prefill), {label} prompt | {v50 * ms:.2f} | {pct(via, 0.99) * ms:.2f} "
              f"| {1 / statistics.mean(via):,.0f} | | | {ratio['via']:.2f} |")  # fmt: skip
        vx = run["via_httpx"]
        print(f"| (the same, client httpx: adds {(statistics.median(vx) - d50) * ms:.2f}) | {statistics.median(vx) * ms:.2f} "
              f"| {pct(vx, 0.99) * ms:.2f} | {1 / statistics.mean(vx):,.0f} | | | {ratio['via_httpx']:.2f} |")  # fmt: skip
        print(f"| router adds, {label} prompt (p50 difference to packed direct) | {added * ms:.2f} | | | {goal} "
              f"| {met} | {added / d50:.2f} |")  # fmt: skip
        conv, new = statistics.median(run["via_conv"]) - d50, statistics.median(run["via_new"]) - d50
        print(f"| (router adds: next turn of a conversation / new conversation) | {conv * ms:.2f} / {new * ms:.2f} "
              f"| | | | | {conv / d50:.2f} / {new / d50:.2f} |")  # fmt: skip
        print(f"| router CPU per request, {label} prompt (all its threads) | {run['router_cpu'] * ms:.2f} | | | | "
              f"| {run['router_cpu'] / d50:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
