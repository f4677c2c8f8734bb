"""An engine's KV bookkeeping, built in one place: the two page pools, the radix cache and its
event buffer, the optional host tier (L2) and the scheduler over them. No tensors, no torch.

The engine (engine.py) builds its bookkeeping here and adds the tensors; the simulated workers
(bench/sim) and the fleet simulation (bench/compare/fleet_des.py) build the same objects here and
add a cost model instead, so a simulated worker admits, evicts and preempts as an engine does.

    pools        full: max_total_tokens / page_size pages
                 SWA:  swa_pages, default 2 * max_running * window_pages (room for every running
                       request's window plus as many cached tails); never under one window
    radix cache  over both pools, its KV events into `events`
    host tier    when host_kv_tokens > 0 and the prefix cache is on: L2's pages, events in `host_events`
    scheduler    over all of it, waiting queue ordered by `queue_policy`
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from services.common.kv_events import EventBuffer
from services.engine.kv.host_tier import HostTier
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import RadixCache
from services.engine.queue_policy import make_queue_policy
from services.engine.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class BookkeepingConfig:
    page_size: int
    window: int  # previous tokens an SWA query sees; 0 for a model without SWA layers
    max_total_tokens: int  # capacity of the full-attention pool, in tokens
    swa_pages: int | None = None  # None: 2 * max_running * window_pages
    chunk_size: int = 512
    max_batch_tokens: int = 2048
    max_running: int = 32
    queue_policy: str = "fcfs"
    enable_prefix_cache: bool = True
    host_kv_tokens: int = 0  # L2: full-attention tokens the host tier holds (0: no L2)
    host_swa_pages: int | None = None  # L2 SWA pages for cached tails (None: as many as full pages)

    @classmethod
    def of(cls, cfg: Any, **given: Any) -> BookkeepingConfig:
        """From a config that carries these fields under the same names (EngineConfig,
        SimEngineConfig): every field it has, `given` for the rest (e.g. the model's window)."""
        names = {f.name for f in fields(cls)}
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n) and n not in given}, **given)

    @property
    def window_pages(self) -> int:
        """SWA pages one request's window can span (a page either side of it)."""
        return math.ceil(self.window / self.page_size) + 2


@dataclass
class Bookkeeping:
    full_pool: PagePool
    swa_pool: PagePool
    cache: RadixCache
    events: EventBuffer  # the radix cache's KV events (tier "l1")
    scheduler: Scheduler
    host: HostTier | None  # L2's bookkeeping, or None
    host_events: EventBuffer | None  # L2's KV events (tier "l2"), or None


def build_bookkeeping(cfg: BookkeepingConfig, clock: Callable[[], float] = time.monotonic) -> Bookkeeping:
    """Pools, radix cache, host tier and scheduler for `cfg`; `clock` is the scheduler's (the
    queue policy's waiting times): a simulation passes its virtual clock."""
    p = cfg.page_size
    num_swa = cfg.swa_pages if cfg.swa_pages is not None else 2 * cfg.max_running * cfg.window_pages
    if num_swa < cfg.window_pages:
        raise ValueError(f"swa_pages must be >= {cfg.window_pages} (one request's window)")
    sched_cfg = SchedulerConfig(
        page_size=p,
        window=cfg.window,
        chunk_size=cfg.chunk_size,
        max_batch_tokens=cfg.max_batch_tokens,
        max_running=cfg.max_running,
        enable_prefix_cache=cfg.enable_prefix_cache,
    )
    policy = make_queue_policy(cfg.queue_policy)
    full_pool = PagePool(cfg.max_total_tokens // p, p, "full")
    swa_pool = PagePool(num_swa, p, "swa")
    events = EventBuffer()
    cache = RadixCache(p, cfg.window, full_pool, swa_pool, event_sink=events)
    host: HostTier | None = None
    host_events: EventBuffer | None = None
    if cfg.host_kv_tokens > 0 and cfg.enable_prefix_cache:
        host_full = cfg.host_kv_tokens // p
        host_swa = cfg.host_swa_pages if cfg.host_swa_pages is not None else host_full
        host_events = EventBuffer()
        host = HostTier(host_full, host_swa, p, cfg.window, event_sink=host_events)
    scheduler = Scheduler(sched_cfg, full_pool, swa_pool, cache, policy, clock, host=host)
    return Bookkeeping(full_pool, swa_pool, cache, events, scheduler, host, host_events)
