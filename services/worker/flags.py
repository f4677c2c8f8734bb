"""The engine flags every worker takes (prefill and decode add their own), and the EngineConfig they make.

helm/swaserve's `engine` values mirror these (swaserve/chart_values.py); keep the two in step.
"""

from __future__ import annotations

import argparse
import os

from services.engine.engine import EngineConfig


def add_engine_args(p: argparse.ArgumentParser, queue_policy: str) -> None:
    p.add_argument("--model", default="smollm2", help="model directory, or a known name (smollm2, mimo-tiny)")
    p.add_argument("--host", default="0.0.0.0", help="address the gRPC server binds")
    p.add_argument("--port", type=int, required=True, help="gRPC port (0: any free port)")
    p.add_argument(
        "--advertise-host",
        default=os.environ.get("SWASERVE_ADVERTISE_HOST") or os.environ.get("POD_IP") or "127.0.0.1",
        help="host other services dial, as registered in Redis",
    )
    p.add_argument("--redis-url", default="", help="Redis for discovery; empty: do not register")
    p.add_argument("--metrics-port", type=int, default=0, help="serve /metrics here (0: off)")
    p.add_argument("--heartbeat-ttl", type=float, default=6.0, help="registry TTL, seconds")
    p.add_argument(
        "--worker-id", default=os.environ.get("SWASERVE_WORKER_ID", ""),
        help="the worker's id in the registry and the prefix index (default: <role>-<host>-<pid>-<port>); "
        "a restart under the same id is told apart by its start id",
    )  # fmt: skip
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV capacity of the full pool, tokens")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--max-running", type=int, default=32)
    p.add_argument("--queue-policy", default=queue_policy, choices=["fcfs", "uncached-first"])
    p.add_argument("--no-prefix-cache", action="store_true")
    p.add_argument(
        "--host-kv-tokens", type=int, default=0,
        help="L2: full-attention tokens of KV kept in host memory behind the prefix cache (0: no L2)",
    )  # fmt: skip
    p.add_argument(
        "--gcache-redis-url", default="",
        help="L3: the Redis where GCache nodes register; empty: no L3 (needs --host-kv-tokens)",
    )  # fmt: skip
    p.add_argument(
        "--l3-model-name", default="",
        help="names the weights in L3 keys: workers share L3 blocks only under one name (default: --model)",
    )  # fmt: skip
    p.add_argument(
        "--l3-lookup-timeout", type=float, default=2.0,
        help="seconds a request waits for its L3 lookup before it is queued without it",
    )  # fmt: skip
    p.add_argument(
        "--l3-max-inflight-mb", type=int, default=256,
        help="L3 write-down: MiB on their way to GCache beyond which new writes are dropped (counted)",
    )  # fmt: skip
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument(
        "--torch-threads", type=int, default=None, help="default: $SWASERVE_TORCH_THREADS or all cores"
    )
    p.add_argument("--log-level", default="INFO")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        chunk_size=args.chunk_size,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        queue_policy=args.queue_policy,
        enable_prefix_cache=not args.no_prefix_cache,
        host_kv_tokens=args.host_kv_tokens,
        dtype=args.dtype,
    )
