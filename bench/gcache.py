"""GCache benchmark: put/get GB/s of 1 MiB and 4 MiB blocks from a Python client to one node on
this host (loopback), over gRPC and over the shared-memory path, next to Redis SET/GET of the same
blocks and memory-copy ceilings, all measured in the same run.

Each call moves one batch of `--batch-mib` MiB (64 x 1 MiB or 16 x 4 MiB blocks, random bytes):
  gcache tcp    GCacheClient(shm=False).put_many / get_many: the remote path, values over the
                node's data plane (a plain TCP connection beside gRPC, data_conn.py), loopback
  gcache grpc   GCacheClient(shm=False, data_plane=False): values as data frames in the gRPC
                streams (the path to nodes without a data plane)
  gcache shm    GCacheClient(shm=True): the same calls through the client's /dev/shm arena
  redis         redis-py pipeline of SET / GET of the same blocks (one round trip per batch),
                against a redis-server started here (the same binary the registry uses)
  memcpy fresh  bytearray(block) for each block, results kept until the batch ends: the copies
                land on pages the process did not have, as get_many's values do
  memcpy warm   numpy copyto into one buffer reused across reps: no page faults, the copy alone
  gRPC raw      the transport alone: a client stream of the batch as 1 MiB messages to a process
                that only counts them (put), and a server stream of prebuilt 1 MiB messages that
                the client keeps until the batch ends (get); same channel options as GCache
GB/s = bytes moved / seconds (1 GB = 1e9 B); median over reps after a warm-up, all paths run in
turn in every rep. The node runs as its own process with a memory tier large enough for the batch
(no disk tier; glibc's allocator tuned as main.py does, services/gcache/malloc.py); puts overwrite
the same keys every rep. This process keeps glibc's defaults, like any client would.
Goals: the remote path (tcp) at least Redis's rate (put and get), the shm path at least 50% of
memcpy fresh.

    python bench/gcache.py [--quick] [--reps N] [--batch-mib M]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.proc_cpu import cpu_seconds  # noqa: E402
from services.common.redis_server import RedisServer  # noqa: E402
from services.gcache.client import GCacheClient  # noqa: E402
from services.gcache.keys import BlockKey  # noqa: E402
from services.gcache.wire import GRPC_OPTIONS  # noqa: E402

MiB = 1 << 20


Op = tuple[Callable[[], object], Callable[[], None]]  # the timed call, and what runs after it


def run_interleaved(ops: dict[str, Op], reps: int, servers: dict[str, int]) -> tuple[dict[str, list[float]], dict[str, tuple[float, float]]]:  # fmt: skip
    """One warm-up round, then `reps` rounds running every op once in turn: load from other jobs
    on the machine hits all paths alike instead of whichever ran at the wrong moment. Returns the
    times, and per op the CPU seconds of this process and of its server process (`servers`: op ->
    pid) over the timed calls: what a path costs, which other jobs' load does not change much."""
    times: dict[str, list[float]] = {name: [] for name in ops}
    cpu = dict.fromkeys(ops, (0.0, 0.0))
    for rnd in range(reps + 1):
        for name, (fn, after) in ops.items():
            pid = servers.get(name)
            c0, s0 = cpu_seconds(os.getpid()), cpu_seconds(pid) if pid else 0.0
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            c1, s1 = cpu_seconds(os.getpid()), cpu_seconds(pid) if pid else 0.0
            after()  # frees happen here, outside the timed region
            if rnd:
                times[name].append(dt)
                cpu[name] = (cpu[name][0] + c1 - c0, cpu[name][1] + s1 - s0)
    return times, cpu


def raw_grpc_server(port_queue: mp.Queue) -> None:  # type: ignore[type-arg]
    """The transport ceiling's far end: Sink counts a client stream, Source streams n copies of a
    message of the requested size."""
    from concurrent import futures

    def sink(frames: object, ctx: object) -> bytes:
        return sum(len(f) for f in frames).to_bytes(8, "big")  # type: ignore[attr-defined]

    def source(req: bytes, ctx: object) -> object:
        msg = os.urandom(int.from_bytes(req[:8], "big"))
        return (msg for _ in range(int.from_bytes(req[8:], "big")))

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Sink": grpc.stream_unary_rpc_method_handler(sink),
        "Source": grpc.unary_stream_rpc_method_handler(source),
    })  # fmt: skip
    server = grpc.server(futures.ThreadPoolExecutor(4), options=GRPC_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port_queue.put(server.add_insecure_port("127.0.0.1:0"))
    server.start()
    server.wait_for_termination()


def start_node(redis_url: str, memory_bytes: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gcache.main", "--host", "127.0.0.1", "--port", "0",
         "--redis-url", redis_url, "--memory-bytes", str(memory_bytes), "--log-level", "WARNING"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("GCACHE_READY"):
        proc.kill()
        raise RuntimeError(f"gcache node did not start: {line!r}")
    return proc


def bench_size(block: int, batch_bytes: int, reps: int, redis_url: str, rds: redis.Redis,
               raw: grpc.Channel, pids: dict[str, int]) -> tuple[dict[str, float], dict[str, tuple[float, float]]]:  # fmt: skip
    n = max(1, batch_bytes // block)
    blocks = [os.urandom(block) for _ in range(n)]
    keys = [BlockKey(os.urandom(16)) for _ in range(n)]
    pairs = list(zip(keys, blocks, strict=True))
    held: list[object] = []

    def keep(x: object) -> None:
        held.append(x)

    def drop() -> None:
        held.clear()

    dst = np.empty(block, dtype=np.uint8)
    srcs = [np.frombuffer(b, dtype=np.uint8) for b in blocks]

    def redis_set() -> None:
        pipe = rds.pipeline(transaction=False)
        for k, b in pairs:
            pipe.set(k, b)
        pipe.execute()

    def redis_get() -> None:
        pipe = rds.pipeline(transaction=False)
        for k in keys:
            pipe.get(k)
        got = pipe.execute()
        assert len(got[-1]) == block
        keep(got)

    chunk = os.urandom(min(block, MiB))
    chunks = n * block // len(chunk)
    sink = raw.stream_unary("/bench.Raw/Sink")
    source = raw.unary_stream("/bench.Raw/Source")

    ops: dict[str, Op] = {
        "memcpy fresh": (lambda: keep([bytearray(b) for b in blocks]), drop),
        "memcpy warm": (lambda: [np.copyto(dst, s) for s in srcs], drop),
        "redis put": (redis_set, drop),
        "redis get": (redis_get, drop),
        "raw put": (lambda: sink(iter([chunk] * chunks)), drop),
        "raw get": (
            lambda: keep(list(source(len(chunk).to_bytes(8, "big") + chunks.to_bytes(8, "big")))),
            drop,
        ),
    }
    clients = {
        "tcp": GCacheClient(redis_url, shm=False),
        "grpc": GCacheClient(redis_url, shm=False, data_plane=False),
        "shm": GCacheClient(
            redis_url, shm=True, shm_bytes=max(256 * MiB, 2 * n * block + 4 * MiB), shm_slots=2
        ),
    }
    for path, c in clients.items():
        assert c.wait_for_nodes(1)

        def put(c: GCacheClient = c) -> None:
            report = c.put_many(pairs)
            assert report.stored == n, report

        def get(c: GCacheClient = c) -> None:
            got = c.get_many(keys)
            assert len(got) == n
            keep(got)

        ops[f"gcache {path} put"] = (put, drop)
        ops[f"gcache {path} get"] = (get, drop)
    try:
        servers = {op: pids[op.split()[0]] for op in ops if op.split()[0] in pids}
        times, cpu = run_interleaved(ops, reps, servers)
        for path, c in clients.items():
            calls = {"shm": c.counters.shm_calls, "grpc": c.counters.grpc_calls, "tcp": c.counters.data_calls}
            assert [p for p, n in calls.items() if n] == [path], f"{path}: {c.counters}"
            got = c.get_many(keys[:2])
            assert got[keys[0]] == blocks[0] and got[keys[1]] == blocks[1]
    finally:
        for c in clients.values():
            c.close()
        rds.flushdb()
    gb = reps * n * block / 1e9
    rates = {name: n * block / statistics.median(t) / 1e9 for name, t in times.items()}
    return rates, {name: (c / gb * 1e3, s / gb * 1e3) for name, (c, s) in cpu.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 reps, 32 MiB batches")
    ap.add_argument("--reps", type=int, default=0)
    ap.add_argument("--batch-mib", type=int, default=0)
    args = ap.parse_args()
    reps = args.reps or (5 if args.quick else 15)
    batch = (args.batch_mib or (32 if args.quick else 64)) * MiB
    sizes = [MiB, 4 * MiB]
    results: dict[int, dict[str, float]] = {}
    cpu: dict[int, dict[str, tuple[float, float]]] = {}
    ctx = mp.get_context("spawn")
    ports: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    raw_server = ctx.Process(target=raw_grpc_server, args=(ports,), daemon=True)
    raw_server.start()
    raw = grpc.insecure_channel(f"127.0.0.1:{ports.get(timeout=30)}", options=GRPC_OPTIONS)
    with RedisServer() as server:
        node = start_node(server.url, memory_bytes=4 * batch + 64 * MiB)
        rds = redis.Redis.from_url(server.url, db=1)
        assert server.proc is not None and raw_server.pid is not None
        pids = {"gcache": node.pid, "redis": server.proc.pid, "raw": raw_server.pid}
        try:
            for size in sizes:
                results[size], cpu[size] = bench_size(size, batch, reps, server.url, rds, raw, pids)
                print(f"  {size // MiB} MiB: " + ", ".join(f"{k} {v:.2f}" for k, v in results[size].items()),
                      flush=True)  # fmt: skip
        finally:
            rds.close()
            raw.close()
            raw_server.terminate()
            node.terminate()
            node.wait(30)
    print_table(results, reps, batch)
    print_cpu(cpu)


def print_table(results: dict[int, dict[str, float]], reps: int, batch: int) -> None:
    print(f"\nGCache, one node on this host, Python client, {batch // MiB} MiB per call, median of {reps} "
          f"interleaved rep(s) after a warm-up, GB/s (1e9 B/s)\n")  # fmt: skip
    print(
        "| block | op | memcpy fresh | memcpy warm | redis | gRPC raw | gcache tcp | tcp / redis "
        "| gcache grpc | grpc / redis | grpc / gRPC raw | gcache shm | shm / memcpy fresh | shm / memcpy warm |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for size, r in results.items():
        for op in ("put", "get"):
            tcp, grpc_, shm = (r[f"gcache {path} {op}"] for path in ("tcp", "grpc", "shm"))
            red, raw = r[f"redis {op}"], r[f"raw {op}"]
            fresh, warm = r["memcpy fresh"], r["memcpy warm"]
            print(f"| {size // MiB} MiB | {op} | {fresh:.2f} | {warm:.2f} | {red:.2f} | {raw:.2f} | {tcp:.2f} "
                  f"| {tcp / red:.2f}x | {grpc_:.2f} | {grpc_ / red:.2f}x | {grpc_ / raw:.0%} | {shm:.2f} "
                  f"| {shm / fresh:.0%} | {shm / warm:.0%} |")  # fmt: skip
            verdicts.append((f"{size // MiB} MiB {op}: tcp (remote path) >= redis", tcp >= red))
            verdicts.append((f"{size // MiB} MiB {op}: shm >= 50% of memcpy fresh", shm >= 0.5 * fresh))
    print()
    for what, ok in verdicts:
        print(f"goal {what}: {'met' if ok else 'MISSED'}")


def print_cpu(cpu: dict[int, dict[str, tuple[float, float]]]) -> None:
    print("\nCPU per GB moved, ms (1 GB = 1e9 B; /proc ticks of 10 ms): client process + server process "
          "(the node, redis-server, the raw gRPC server)\n")  # fmt: skip
    paths = ("gcache tcp", "gcache grpc", "redis", "raw", "gcache shm")
    print("| block | op | " + " | ".join(paths) + " | tcp / redis |")
    print("|---|---|" + "---|" * (len(paths) + 1))
    for size, r in cpu.items():
        for op in ("put", "get"):
            tot = {p: sum(r[f"{p} {op}"]) for p in paths}
            cells = " | ".join(f"{r[f'{p} {op}'][0]:.0f} + {r[f'{p} {op}'][1]:.0f}" for p in paths)
            print(f"| {size // MiB} MiB | {op} | {cells} | {tot['gcache tcp'] / tot['redis']:.2f}x |")


if __name__ == "__main__":
    main()
