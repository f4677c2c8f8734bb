"""One simulated worker's lifecycle: its engine or decoder, its server, its registry record, its KV events.

    start():  engine (prefill, both) or decoder (decode) -> gRPC (prefill, decode) or HTTP (both)
              server -> register in Redis as the real workers do (WorkerRecord with load, fresh
              after every simulated step) -> prefill: publish the radix cache's KV events
    stop():   deregister, clear the KV events state, stop the server, stop the engine

Every record carries labels["simulated"] = "1"; the server's answers and the log say so too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Generator, Mapping
from dataclasses import dataclass

import grpc
import uvicorn

from bench.sim.cost_model import CostModel
from bench.sim.decode import SimDecoder
from bench.sim.engine import SimEngine, SimEngineConfig
from bench.sim.grpc_worker import SimDecodeServicer, SimPrefillServicer, start_grpc_server
from bench.sim.http_worker import HttpWorkerInfo, SimHttpWorker
from bench.sim.serving import SimServing
from bench.sim.stats import SimStats
from services.common.kv_event_bus import KVEventPublisher
from services.common.registry import WorkerRecord, WorkerRegistry

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode", "both")


@dataclass(frozen=True)
class SimWorkerConfig:
    role: str
    model: str
    engine: SimEngineConfig
    cost: CostModel
    host: str = "127.0.0.1"
    advertise_host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    redis_url: str = ""  # "": do not register
    heartbeat_ttl: float = 6.0
    bucket: str = ""
    kv_events: bool = True  # prefill: publish the radix cache's KV events (needs redis_url)
    reserve_ttl: float = 30.0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")


class _QuietServer(uvicorn.Server):
    """Several servers share one event loop: signals are the host process's business, not theirs."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class SimWorker:
    def __init__(self, cfg: SimWorkerConfig, stats: SimStats) -> None:
        self.cfg = cfg
        self.stats = stats
        self.engine: SimEngine | None = None
        self.decoder: SimDecoder | None = None
        self.port = 0
        self.worker_id = ""
        self._grpc: grpc.aio.Server | None = None
        self._http: _QuietServer | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._registry: WorkerRegistry | None = None
        self._kv_events: KVEventPublisher | None = None

    @property
    def addr(self) -> str:
        return f"{self.cfg.advertise_host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.addr}" if self.cfg.role == "both" else self.addr

    async def start(self) -> SimWorker:
        cfg = self.cfg
        if cfg.role == "decode":
            self.decoder = SimDecoder(
                cfg.engine.max_total_tokens, cfg.engine.max_running, cfg.cost, cfg.reserve_ttl
            )
            self._grpc, self.port = await start_grpc_server(
                cfg.host, cfg.port, SimDecodeServicer(self.decoder, cfg.model, self.stats)
            )
        else:
            self.engine = SimEngine(cfg.engine, cfg.cost, name=f"sim-{cfg.role}").start()
            if cfg.role == "prefill":
                servicer = SimPrefillServicer(self.engine, cfg.model, self.stats)
                self._grpc, self.port = await start_grpc_server(cfg.host, cfg.port, servicer)
            else:
                await self._start_http()
        self.worker_id = f"{cfg.role}-{socket.gethostname()}-{os.getpid()}-{self.port}"
        self.start_id = secrets.token_hex(8)  # the incarnation: registry record and KV events' epoch
        if cfg.redis_url:
            self._attach(await asyncio.to_thread(self._register))
        return self

    async def _start_http(self) -> None:
        assert self.engine is not None
        info = HttpWorkerInfo(self.cfg.model, "", self.cfg.engine, self.cfg.cost.time_scale)
        worker = SimHttpWorker(SimServing(self.engine, self.stats), info, self.stats)
        config = uvicorn.Config(
            worker.app(), host=self.cfg.host, port=self.cfg.port, log_level="warning", access_log=False,
            lifespan="off", timeout_graceful_shutdown=2,
        )  # fmt: skip
        self._http = _QuietServer(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # raises the bind error
                raise OSError(f"HTTP server on {self.cfg.host}:{self.cfg.port} stopped at start")
            await asyncio.sleep(0.01)
        self.port = int(self._http.servers[0].sockets[0].getsockname()[1])
        worker.info = HttpWorkerInfo(self.cfg.model, f"both-{socket.gethostname()}-{os.getpid()}-{self.port}",
                                     self.cfg.engine, self.cfg.cost.time_scale)  # fmt: skip

    def _labels(self) -> dict[str, str]:
        labels = {"simulated": "1", "time_scale": f"{self.cfg.cost.time_scale:g}"}
        if self.cfg.role != "decode":  # the router's cost scorer reads this (wall-clock tokens/s)
            tps = self.cfg.cost.prefill_tokens_per_s() * self.cfg.cost.time_scale
            labels["prefill_tokens_per_s"] = f"{tps:.0f}"
        if self.cfg.bucket:
            labels["bucket"] = self.cfg.bucket
        return labels

    def _load(self) -> Mapping[str, int]:  # the registry's heartbeat thread: read snapshots only
        if self.decoder is not None:
            return self.decoder.snapshot
        assert self.engine is not None
        s = self.engine.load
        return {"running": s.running, "waiting": s.waiting, "free_kv_tokens": s.free_tokens,
                "queued_tokens": s.queued_tokens}  # fmt: skip

    def _register(self) -> WorkerRegistry:
        """Write the record (blocking: run in a thread); the heartbeat keeps it alive."""
        cfg = self.cfg
        registry = WorkerRegistry(cfg.redis_url, ttl=cfg.heartbeat_ttl)
        capacity = cfg.engine.max_total_tokens // cfg.engine.page_size * cfg.engine.page_size
        record = WorkerRecord(
            role=cfg.role, addr=self.addr, model=cfg.model, capacity_tokens=capacity,
            worker_id=self.worker_id, labels=self._labels(), start_id=self.start_id,
        )  # fmt: skip
        registry.register(record, load_fn=self._load)
        return registry

    def _attach(self, registry: WorkerRegistry) -> None:
        """Fresh loads after every simulated step; prefill: KV events from the real radix cache."""
        cfg = self.cfg
        self._registry = registry
        if self.decoder is not None:
            self.decoder.on_change.append(registry.notify)
            return
        assert self.engine is not None
        engine = self.engine
        engine.on_change.append(lambda e: registry.notify())
        if cfg.role == "prefill" and cfg.kv_events:
            publisher = KVEventPublisher(
                cfg.redis_url, self.worker_id, cfg.engine.page_size, cfg.engine.window,
                snapshot_fn=engine.cache.block_hashes, epoch=self.start_id,
            )  # fmt: skip
            self._kv_events = publisher
            engine.on_change.append(lambda e: publisher.publish_buffer(e.events))
            publisher.publish_buffer(engine.events)  # the first publish writes the whole state

    async def stop(self) -> None:
        if self._registry is not None:
            await asyncio.to_thread(self._registry.close)  # first: routers stop sending work here
        if self._kv_events is not None:
            await asyncio.to_thread(self._kv_events.close)  # routers drop this worker's blocks
        if self._grpc is not None:
            await self._grpc.stop(grace=2.0)
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            await self._http_task
        if self.engine is not None:
            await self.engine.stop()
