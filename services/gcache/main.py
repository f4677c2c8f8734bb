"""Run a GCache node: `python -m services.gcache.main --port 7600 --redis-url redis://... --memory-bytes 8G`.

SIGTERM / SIGINT drain the node (hand its blocks to the other nodes, deregister) and exit 0;
see node.py. Sizes take K/M/G/T suffixes (powers of 1024).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from services.gcache.discovery import default_host_id
from services.gcache.malloc import tune_glibc_malloc
from services.gcache.node import GCacheNode, NodeConfig
from services.gcache.store import StoreConfig

log = logging.getLogger("services.gcache.main")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'1048576', '64M', '8G', '1.5G' -> bytes (suffixes are powers of 1024; an optional B/iB is ignored)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    number = t[: len(t) - len(unit)]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative size: {text!r}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.gcache.main", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC server binds")
    p.add_argument("--port", type=int, default=7600, help="gRPC port (0: any free port)")
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("SWASERVE_ADVERTISE_HOST") or os.environ.get("POD_IP") or "127.0.0.1",
        help="host clients dial, as registered in Redis",
    )
    p.add_argument(
        "--data-port",
        type=int,
        default=0,
        help="data plane TCP port (0: any free port, -1: off, values over gRPC)",
    )
    p.add_argument("--redis-url", default="", help="Redis for registration; empty: do not register")
    p.add_argument("--memory-bytes", type=parse_bytes, default=parse_bytes("1G"), help="memory tier budget")
    p.add_argument("--disk-dir", default="", help="directory of the disk tier (empty: no disk tier)")
    p.add_argument("--disk-bytes", type=parse_bytes, default=0, help="disk tier budget (0: no disk tier)")
    p.add_argument(
        "--max-value-bytes", type=parse_bytes, default=parse_bytes("64M"), help="largest value accepted"
    )
    p.add_argument(
        "--protected-fraction", type=float, default=0.8, help="SLRU: share of a tier for re-read blocks"
    )
    p.add_argument(
        "--metrics-port", type=int, default=-1, help="serve /metrics here (0: any free port, -1: off)"
    )
    p.add_argument("--heartbeat-ttl", type=float, default=6.0, help="registry TTL, seconds")
    p.add_argument(
        "--replication", type=int, default=1, help="the clients' replication factor (for the drain)"
    )
    p.add_argument("--node-id", default="", help="ring identity (default gcache-<advertise-host>-<port>)")
    p.add_argument("--host-id", default=default_host_id(), help="same-host identity for the shm path")
    p.add_argument(
        "--drain-grace", type=float, default=2.0, help="seconds served after deregistering on SIGTERM"
    )
    p.add_argument(
        "--default-malloc", action="store_true", help="keep glibc's allocator defaults (malloc.py)"
    )
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def node_config(args: argparse.Namespace) -> NodeConfig:
    store = StoreConfig(
        memory_bytes=args.memory_bytes,
        disk_dir=Path(args.disk_dir) if args.disk_dir else None,
        disk_bytes=args.disk_bytes if args.disk_dir else 0,
        max_value_bytes=args.max_value_bytes,
        protected_fraction=args.protected_fraction,
    )
    return NodeConfig(
        store=store, host=args.host, port=args.port, advertise_host=args.advertise_host, redis_url=args.redis_url,
        metrics_port=args.metrics_port, heartbeat_ttl=args.heartbeat_ttl, replication=args.replication,
        node_id=args.node_id, host_id=args.host_id, drain_grace=args.drain_grace, data_port=args.data_port,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.default_malloc:
        tune_glibc_malloc()
    node = GCacheNode(node_config(args)).start()
    # one line on stdout that launchers (tests, bench) wait for
    data_port = node.data_plane.port if node.data_plane is not None else -1
    print(f"GCACHE_READY {node.node_id} {node.addr} metrics={node.metrics_port} data={data_port}", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("gcache node %s: signal %d, draining", node.node_id, signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    try:
        node.drain()
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
