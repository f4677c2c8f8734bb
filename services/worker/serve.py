"""What the prefill and decode workers' `main` share: the serving lifecycle (flags: flags.py).

load the engine -> EngineLoop thread -> gRPC server (+ the role's servicers) -> /metrics
-> register in Redis (TTL heartbeat with load) [-> publish KV cache events, prefill]
(GET /ready on the metrics port says 200 from here on: WorkerReadiness)
-> wait for SIGTERM / SIGINT (/ready 503 again) -> deregister, clear the KV events state -> stop accepting RPCs
(grace) -> stop the loop
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.grpc_server import make_server
from services.common.kv_event_bus import KVEventPublisher
from services.common.probe_http import ProbeServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.engine.engine import Engine
from services.models.model_store import resolve_model
from services.worker.engine_loop import EngineLoop
from services.worker.flags import engine_config
from services.worker.loop_metrics import L3Collector

log = logging.getLogger(__name__)


@dataclass
class Built:
    """What a role's build function returns: something to close, and its load for the registry."""

    close: Callable[[], None]
    load: Callable[[], Mapping[str, int]]
    labels: dict[str, str]
    kv_events: bool = False  # publish the prefix cache's KV events to Redis (prefill)


def attach_kv_events(loop: EngineLoop, redis_url: str, worker_id: str, **kw: Any) -> KVEventPublisher:
    """Publish the engine's KV cache events to Redis after every loop step (docs/kv-events.md).
    Set before requests arrive; the first publish writes the cache's whole (empty) state."""
    engine = loop.engine
    publisher = KVEventPublisher(
        redis_url, worker_id, engine.cfg.page_size, engine.window,
        snapshot_fn=engine.cache.block_hashes, **kw,  # called on the loop thread
    )  # fmt: skip
    chain_after_step(loop, lambda e: publisher.publish_buffer(e.events))
    return publisher


L2_TIER = "l2"


def attach_l2_events(
    loop: EngineLoop, redis_url: str, worker_id: str, epoch: str = ""
) -> KVEventPublisher | None:
    """Publish the host tier's events (tier "l2") after every loop step, if the engine has one.
    Its index uses a one-page window: an "swa" entry at page L - 1 is a tail, so L is restorable
    (services/engine/kv/host_tier.py)."""
    engine = loop.engine
    host, events = engine.host, engine.host_events
    if host is None or events is None:
        return None
    page = engine.cfg.page_size
    publisher = KVEventPublisher(
        redis_url, worker_id, page, page, tier=L2_TIER, snapshot_fn=host.snapshot, epoch=epoch
    )
    chain_after_step(loop, lambda e: publisher.publish_buffer(events))
    return publisher


def chain_after_step(loop: EngineLoop, hook: Callable[[Engine], None]) -> None:
    """Run `hook` after every loop step, after the hooks already set."""
    prev = loop.after_step
    if prev is None:
        loop.after_step = hook
        return

    def both(e: Engine) -> None:
        prev(e)
        hook(e)

    loop.after_step = both


def attach_l3(engine: Engine, args: argparse.Namespace) -> Any:
    """Connect the engine to GCache as its L3 if --gcache-redis-url is set; returns the client."""
    if not args.gcache_redis_url:
        return None
    if engine.host is None:
        raise SystemExit("--gcache-redis-url needs --host-kv-tokens > 0: L3 is restored through L2")
    if args.l3_lookup_timeout <= 0 or args.l3_max_inflight_mb <= 0:
        raise SystemExit("--l3-lookup-timeout and --l3-max-inflight-mb must be > 0")
    from services.gcache.client import GCacheClient

    client = GCacheClient(args.gcache_redis_url)
    engine.attach_l3(
        client, args.l3_model_name or args.model, max_inflight_bytes=args.l3_max_inflight_mb << 20
    )
    engine.l3_wait = args.l3_lookup_timeout
    log.info("L3: GCache at %s, namespace %s", args.gcache_redis_url, engine.l3.ns if engine.l3 else "")
    return client


BuildFn = Callable[[EngineLoop, grpc.Server, Any], Built]


@dataclass
class WorkerReadiness:
    """What the worker's GET /ready answers (services/common/probe_http.py): ready once the engine
    is loaded and its loop runs, the gRPC server serves, and (with --redis-url) the first registration
    reached Redis; not ready again once shutting down or if the engine loop died. A later Redis outage
    does not make it unready: routers keep routing to known workers through one."""

    needs_registry: bool = False
    loop: EngineLoop | None = None  # set once serving
    registry: WorkerRegistry | None = None
    stopping: bool = False
    registered: bool = False

    def check(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting_down"
        if self.loop is None:
            return False, "loading"
        if not self.loop.alive:
            return False, "engine_stopped"
        if self.needs_registry and not self.registered:
            if self.registry is None or not self.registry.healthy:
                return False, "not_registered"
            self.registered = True
        return True, ""


def serve(role: str, args: argparse.Namespace, build: BuildFn, metrics: Any) -> int:
    """Run a worker until SIGTERM / SIGINT. `build(loop, server, metrics)` adds the role's servicers."""
    logging.basicConfig(
        level=args.log_level.upper(), format=f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s"
    )
    ready = WorkerReadiness(needs_registry=bool(args.redis_url))
    probes, metrics_addr = None, ""
    if args.metrics_port:  # first: liveness answers while the engine loads, readiness says "loading"
        probes = ProbeServer(metrics.registry, args.metrics_port, args.host, ready.check)
        metrics_addr = f"{args.advertise_host}:{probes.port}"
    model_dir = resolve_model(args.model)
    engine = Engine.from_dir(model_dir, engine_config(args))
    l3_client = attach_l3(engine, args)
    loop = EngineLoop(engine, threads=args.torch_threads, name=f"{role}-engine").start()
    server, port = make_server(args.host, args.port)
    built = build(loop, server, metrics)
    if engine.l3 is not None:
        metrics.registry.register(L3Collector(role, engine.l3.counters_dict))
    server.start()
    addr = f"{args.advertise_host}:{port}"
    registry = None
    if args.redis_url:
        registry = WorkerRegistry(args.redis_url, ttl=args.heartbeat_ttl)
        record = WorkerRecord(
            role=role,
            addr=addr,
            model=args.model,
            capacity_tokens=engine.full_pool.num_pages * engine.cfg.page_size,
            metrics_addr=metrics_addr,
            worker_id=args.worker_id or f"{role}-{socket.gethostname()}-{os.getpid()}-{port}",
            labels={"model_dir": model_dir.name, **built.labels},
            start_id=secrets.token_hex(8),  # this process's incarnation (fencing: docs/kv-events.md)
        )
        registry.register(record, load_fn=built.load)
        reg = registry
        chain_after_step(loop, lambda e: reg.notify())  # fresh loads for the routers (registry.py)
    kv_events = l2_events = None
    if registry is not None and built.kv_events:  # keyed like the registry: on_leave forgets by it
        kv_events = attach_kv_events(loop, args.redis_url, worker_id=record.worker_id, epoch=record.start_id)
        l2_events = attach_l2_events(loop, args.redis_url, worker_id=record.worker_id, epoch=record.start_id)
    ready.loop, ready.registry = loop, registry
    print(
        f"swaserve {role} worker ready on {addr} (model {args.model}"
        + (f", metrics http://{metrics_addr}/metrics" if metrics_addr else "")
        + ")",
        file=sys.stderr,
        flush=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("%s: signal %d, shutting down", role, signum)
        ready.stopping = True
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    code = 0
    while not stop.wait(1.0):
        if not loop.alive:  # the engine thread died: exit, so that the supervisor restarts the worker
            log.error("%s: the engine loop stopped unexpectedly; exiting", role)
            code = 1
            break
    if registry is not None:
        registry.close()  # first: the router stops sending new work here
    for publisher in (kv_events, l2_events):
        if publisher is not None:
            publisher.close()  # routers drop this worker's blocks
    server.stop(grace=5.0).wait()
    built.close()
    loop.stop()
    if engine.l3 is not None:
        engine.l3.close()
    if l3_client is not None:
        l3_client.close()
    if probes is not None:
        probes.close()
    return code
