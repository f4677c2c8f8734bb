"""Run the router: `python -m services.router.main --port P --model NAME (--redis-url URL | --prefill ADDR --decode ADDR)`;
with `--discovery kubernetes` the Ready worker pods are the routable workers (docs/discovery.md).

The router never builds a model (that imports torch): a known model name resolves to its directory
under the swaserve home, which the workers build; the router waits for it to appear.

Routing policy flags: policy/config.py (`add_policy_args`). With --redis-url the router follows the
workers' KV events into a prefix index (`--prefix-index auto`: load-only routing when the follower
cannot start; `on`: a follower that cannot start stops the router; `off`: load-only routing).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import uvicorn

from services.common.kv_index_follower import KVIndexFollower
from services.common.registry import WorkerRecord
from services.models.home import models_dir
from services.models.model_store import find_known
from services.router.app import create_app
from services.router.auth_args import add_api_key_args, api_key_gate
from services.router.k8s_discovery import add_k8s_args, kubernetes_pool
from services.router.policy.config import PolicyConfig, add_policy_args, policy_config_from_args
from services.router.routing import IndexSource, policy_reads_l2
from services.router.settings import RouterSettings
from services.router.toolcalls import PARSER_CHOICES
from services.router.workers import StaticWorkerPool, WorkerPool

log = logging.getLogger("swaserve.router")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.router.main", description="swaserve OpenAI router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument(
        "--model", required=True, help="known model name (e.g. smollm2, mimo-tiny) or a model directory"
    )
    p.add_argument("--served-model-name", help="the id clients use (default: --model)")
    workers = p.add_mutually_exclusive_group()
    workers.add_argument("--redis-url", help="discover workers in the Redis registry")
    workers.add_argument(
        "--prefill", action="append", help="prefill worker host:port (repeat or comma-separate)"
    )
    p.add_argument("--decode", action="append", help="decode worker host:port (repeat or comma-separate)")
    p.add_argument("--max-context", type=int, help="override the model's max_position_embeddings")
    p.add_argument("--kv-transport", default="grpc", help="KV transport asked of prefill workers")
    p.add_argument(
        "--model-wait", type=float, default=600.0, help="seconds to wait for the workers to build the model"
    )
    p.add_argument(
        "--prefix-index",
        choices=["auto", "on", "off"],
        default="auto",
        help="cache-aware routing from the workers' KV events in Redis (needs --redis-url)",
    )
    p.add_argument(
        "--tool-call-parser", choices=PARSER_CHOICES, default="auto",
        help="how tool calls are read from the model's text: mimo (Qwen3-Coder XML), hermes (JSON in "
        "<tool_call>), auto (from the chat template, then config.json) (docs/tools-and-reasoning.md)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--discovery", choices=["redis", "kubernetes"], default="redis",
        help="which workers are routable: their Redis records, or their Ready pods (then --redis-url, "
        "if given, still supplies loads and the prefix index; see --k8s-*)",
    )  # fmt: skip
    add_k8s_args(p)
    add_policy_args(p)
    add_api_key_args(p)
    args = p.parse_args(argv)
    if args.discovery == "kubernetes" and args.prefill:
        p.error("--discovery kubernetes finds the workers itself: drop --prefill/--decode")
    if args.discovery == "redis" and not args.redis_url and not args.prefill:
        p.error("one of --redis-url, --prefill/--decode or --discovery kubernetes is required")
    if args.prefix_index == "on" and not args.redis_url:
        p.error("--prefix-index on needs --redis-url")
    if args.prefill and not args.decode:
        p.error("--prefill needs --decode")
    if args.decode and not args.prefill:
        p.error("--decode needs --prefill")
    return args


def model_dir_for(name: str, wait_s: float) -> tuple[Path, tuple[str, ...]]:
    """The model's directory and the other names it is known by; waits for a known model to be built."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path, ()
    known = find_known(name)
    if known is None:
        raise SystemExit(f"--model {name!r}: not a directory and not a known model")
    target = models_dir() / known.dir_name  # present only when complete (model_store builds atomically)
    deadline = time.monotonic() + wait_s
    if not target.is_dir():
        logging.getLogger("swaserve.router").info("waiting for the workers to build %s in %s", name, target)
    while not target.is_dir():
        if time.monotonic() > deadline:
            raise SystemExit(f"--model {name!r}: {target} did not appear within {wait_s:.0f}s")
        time.sleep(0.5)
    return target, tuple(a for a in (*known.aliases, known.dir_name) if a != name)


def model_window(model_dir: Path) -> int:
    """The SWA window of the model in `model_dir` (0 without SWA layers); read without torch."""
    from services.models.config import ModelConfig

    try:
        raw = json.loads((model_dir / "config.json").read_text())
        return ModelConfig.from_dict(raw).window or 0
    except (OSError, ValueError, KeyError) as e:
        log.warning("could not read the SWA window from %s (%s); use --kv-window", model_dir, e)
        return PolicyConfig().window


def index_follower(args: argparse.Namespace, policy: PolicyConfig, tier: str = "l1") -> IndexSource | None:
    """The KV event follower feeding the prefix index of `tier`, or None (load-only routing). The
    L2 (host tier) index has a one-page window: its "swa" entries are tail ends."""
    if args.prefix_index == "off" or not args.redis_url:
        return None
    try:
        window = policy.window if tier == "l1" else policy.page_size
        follower = KVIndexFollower(
            args.redis_url, policy.page_size, window, tier=tier, pending_max_ttl_s=policy.pending_ttl_max_s
        )
        follower.start()
    except Exception as e:
        if args.prefix_index == "on":
            raise
        log.warning("prefix index follower failed to start (%s); load-only routing", e)
        return None
    source: IndexSource = follower
    return source


def routed_residency(args: argparse.Namespace, policy: PolicyConfig, index: IndexSource | None) -> Any:
    """Routing-time residency (services/router/residency.py) on the L1 index, unless turned off."""
    prefix_index = getattr(index, "index", None)
    if not policy.pending or prefix_index is None or not hasattr(prefix_index, "add_pending"):
        return None
    from services.router.residency import RoutedResidency

    return RoutedResidency(policy, prefix_index, args.redis_url)


def worker_pool(args: argparse.Namespace, model: str, *indexes: IndexSource | None) -> WorkerPool:
    """Static from the command line, discovered in Redis (workers registered with `model`), or
    (--discovery kubernetes) the Ready worker pods, with their loads from Redis when it is given."""
    if args.discovery == "kubernetes":
        loads = redis_pool(args, model, *indexes) if args.redis_url else None
        return kubernetes_pool(args, model, loads)
    if args.redis_url:
        return redis_pool(args, model, *indexes)
    return StaticWorkerPool(_split(args.prefill), _split(args.decode))


def redis_pool(args: argparse.Namespace, model: str, *indexes: IndexSource | None) -> WorkerPool:
    """Workers (and their loads) in the Redis registry."""
    if args.redis_url:
        try:
            from services.router.discovery import RedisWorkerPool
        except ImportError:
            raise SystemExit(
                "--redis-url: Redis discovery is not available in this build; use --prefill/--decode"
            ) from None
        forgets = [f for f in (getattr(i, "forget_worker", None) for i in indexes) if f is not None]
        fences = [f for f in (getattr(i, "fence", None) for i in indexes) if f is not None]

        def forget(worker_id: str) -> None:
            for f in forgets:
                f(worker_id)

        def fence(rec: WorkerRecord) -> None:  # a restarted worker's old blocks stop counting
            for f in fences:
                f(rec.worker_id, rec.start_id)

        pool: WorkerPool = RedisWorkerPool(
            args.redis_url,
            model=model,
            on_leave=forget if forgets else None,
            on_record=fence if fences else None,
        )
        return pool
    raise SystemExit("Redis discovery needs --redis-url")


def _split(values: list[str]) -> list[str]:
    return [a.strip() for v in values for a in v.split(",") if a.strip()]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_dir, aliases = model_dir_for(args.model, args.model_wait)
    served = args.served_model_name or args.model
    try:
        policy = policy_config_from_args(args, default_window=model_window(model_dir))
    except (OSError, ValueError) as e:
        raise SystemExit(f"routing policy: {e}") from None
    settings = RouterSettings(
        model_dir=model_dir,
        served_model=served,
        model_aliases=tuple(a for a in (args.model, *aliases) if a != served),
        max_context=args.max_context,
        kv_transport=args.kv_transport,
        policy=policy,
        tool_call_parser=args.tool_call_parser,
    )
    index = index_follower(args, policy)
    # the host tiers' index only where a scorer reads it (the cost policy)
    l2_index = (
        index_follower(args, policy, tier="l2") if index is not None and policy_reads_l2(policy) else None
    )
    pool = worker_pool(args, args.model, index, l2_index)
    residency = routed_residency(args, policy, index)
    gate = api_key_gate(args)
    app = create_app(settings, pool, index=index, l2_index=l2_index, residency=residency, api_keys=gate)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5,
        loop="uvloop", http="httptools",  # libuv loop and the C HTTP parser: ~1/3 less overhead a request
    )  # fmt: skip


if __name__ == "__main__":
    main()
