"""A simulated prefill engine: the real Scheduler, KV pools and radix cache, with time from the cost model.

    submit(rid, prompt) -> waiting queue (the real Scheduler, fcfs or uncached-first)
    run():  schedule a batch (admission matches the real radix cache, window-safe)
            -> sleep the cost model's time for the batch's spans (simulated, / time_scale)
            -> commit every span (prompt ends go to the radix cache, SWA pages leave the window)
            -> requests whose prompt is done get their first token and finish (max_tokens = 1)
            -> on_change hooks (KV events to Redis, registry load)

Bookkeeping only: pages and token ids, no tensors. The loop is a coroutine; everything that
touches the engine runs on the same event loop, so there are no locks. A step's end is a deadline
on the simulated clock, and a step that follows another without a pause starts at the previous
deadline, so the timeline does not drift by the loop's own latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.sim.clock import SimClock
from bench.sim.cost_model import CostModel
from bench.sim.tokens import output_tokens
from services.common.sampling_params import SamplingParams
from services.engine.bookkeeping import BookkeepingConfig, build_bookkeeping
from services.engine.queue_policy import make_queue_policy
from services.engine.request import FinishReason, Req
from services.engine.scheduler import ScheduledStep

log = logging.getLogger(__name__)

# A simulated request's sampling: nothing reads it (the Scheduler and radix cache never do; the sim samples nothing).
SIM_PARAMS = SamplingParams(temperature=0.0)
IDLE_TICK_S = 0.5  # on_change runs this often when idle (KV event publishing, like the real loop)
MAX_CATCH_UP_S = 0.05  # wall-clock lateness of the loop that the next step's start absorbs


@dataclass(frozen=True)
class SimEngineConfig:
    """Capacity, as the real engine's flags (defaults: the LMSYS MiMo-V2-Flash deployment)."""

    page_size: int = 16
    window: int = 128
    max_total_tokens: int = 1 << 20  # full-attention pool, tokens
    swa_pages: int | None = None  # default: as the real engine, 2 * max_running windows
    chunk_size: int = 16384
    max_batch_tokens: int = 16384
    max_running: int = 128
    queue_policy: str = "fcfs"
    enable_prefix_cache: bool = True
    max_context: int = 262_144  # MiMo-V2-Flash max_position_embeddings

    def __post_init__(self) -> None:
        if self.max_total_tokens < self.page_size:
            raise ValueError("max_total_tokens must hold at least one page")
        make_queue_policy(self.queue_policy)  # unknown names fail here


@dataclass(frozen=True)
class PrefillOutcome:
    rid: str
    prompt_len: int
    first_token: int
    cached_tokens: int  # prompt tokens whose KV came from the radix cache at admission
    queue_seconds: float  # wall clock: submit to the start of the first step that scheduled it
    prefill_seconds: float  # wall clock: that start to the end of the step that sampled
    finished_at: float  # time.monotonic() of that end


@dataclass(frozen=True)
class EngineLoad:
    running: int = 0
    waiting: int = 0
    free_tokens: int = 0  # full-pool tokens free or evictable from the cache
    capacity_tokens: int = 0
    queued_tokens: int = 0  # prompt tokens admitted or waiting but not computed yet


class PrefillAborted(Exception):
    """The request was aborted before its first token."""


class PrefillFailed(Exception):
    """The engine cannot serve the request (it does not fit the KV pools)."""


@dataclass
class _Tracked:
    req: Req
    future: asyncio.Future[PrefillOutcome]
    submitted: float  # wall clock
    admitted: float | None = None


OnChange = Callable[["SimEngine"], None]


class SimEngine:
    def __init__(self, cfg: SimEngineConfig, cost: CostModel, name: str = "sim") -> None:
        self.cfg = cfg
        self.cost = cost
        self.clock = SimClock(cost.time_scale)
        self.name = name
        bk = build_bookkeeping(BookkeepingConfig.of(cfg), self.clock.now)
        self.full_pool, self.swa_pool, self.cache = bk.full_pool, bk.swa_pool, bk.cache
        self.events, self.scheduler = bk.events, bk.scheduler
        self.on_change: list[OnChange] = []
        self.load = EngineLoad(capacity_tokens=self.capacity_tokens, free_tokens=self.capacity_tokens)
        self.steps = 0
        self.busy_sim_seconds = 0.0
        self._tracked: dict[str, _Tracked] = {}
        self._deferred_aborts: set[str] = set()
        self._stepping = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def capacity_tokens(self) -> int:
        return self.full_pool.num_pages * self.cfg.page_size

    # -- requests ------------------------------------------------------------------------------
    def submit(self, rid: str, prompt_ids: Sequence[int]) -> asyncio.Future[PrefillOutcome]:
        """Queue a prompt; the future resolves with its first token (PrefillAborted, PrefillFailed)."""
        ids = [int(t) for t in prompt_ids]
        if not ids or min(ids) < 0:
            raise ValueError("prompt must be at least one token id, ids >= 0")
        if len(ids) >= self.cfg.max_context:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the model's context is {self.cfg.max_context} "
                "(prompt plus at least one generated token)"
            )
        if len(ids) + 1 > self.capacity_tokens:
            raise ValueError(f"prompt has {len(ids)} tokens; the KV pool holds {self.capacity_tokens}")
        if rid in self._tracked:
            raise ValueError(f"request {rid!r} is already running here")
        req = Req(rid=rid, prompt_ids=ids, params=SIM_PARAMS, arrival=self.clock.now())
        fut: asyncio.Future[PrefillOutcome] = asyncio.get_running_loop().create_future()
        self._tracked[rid] = _Tracked(req, fut, time.monotonic())
        self.scheduler.add(req)
        self._changed()
        self._wake.set()
        return fut

    def abort(self, rid: str) -> bool:
        """Abort a queued or running prefill; applied between steps. False if unknown here."""
        if rid not in self._tracked:
            return False
        if self._stepping:
            self._deferred_aborts.add(rid)
        else:
            self._abort_now(rid)
            self._changed()
        return True

    def _abort_now(self, rid: str) -> None:
        tracked = self._tracked.pop(rid, None)
        if tracked is None:
            return
        tracked.req.finish(FinishReason.ABORT)
        self.scheduler.finish(tracked.req)  # caches what was computed, as the real engine does
        if not tracked.future.done():
            tracked.future.set_exception(PrefillAborted(rid))

    def _fail(self, req: Req, message: str) -> None:
        tracked = self._tracked.pop(req.rid, None)
        req.cached_len = req.computed_len = 0
        req.finish(FinishReason.ABORT)
        self.scheduler.finish(req)
        if tracked is not None and not tracked.future.done():
            tracked.future.set_exception(PrefillFailed(f"{req.rid}: {message}"))

    # -- the loop ------------------------------------------------------------------------------
    def start(self) -> SimEngine:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"{self.name}-engine")
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for rid in list(self._tracked):
            tracked = self._tracked.pop(rid)
            if not tracked.future.done():
                tracked.future.set_exception(PrefillFailed(f"{rid}: engine stopped"))

    async def run(self) -> None:
        busy_until: float | None = None  # simulated deadline of the last step, while busy
        while True:
            if not self.scheduler.has_work():
                busy_until = None
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), IDLE_TICK_S)
                except TimeoutError:
                    self._changed()
                continue
            busy_until = await self._step(busy_until)

    async def _step(self, busy_until: float | None) -> float | None:
        now = self.clock.now()
        # back to back: start where the last step ended, unless the loop fell far behind (then now)
        start = (
            now
            if busy_until is None
            else min(now, max(busy_until, now - self.clock.time_scale * MAX_CATCH_UP_S))
        )
        batch = self.scheduler.schedule()
        if not batch:
            if not self.scheduler.running:  # the head of the queue can never be admitted
                for req in list(self.scheduler.waiting):
                    self._fail(req, "the KV pools cannot hold this request")
            self._changed()
            await asyncio.sleep(0.001)
            return None
        wall_start = time.monotonic() - self.clock.real(now - start)
        for st in batch:
            tracked = self._tracked.get(st.req.rid)
            if tracked is not None and tracked.admitted is None:
                tracked.admitted = wall_start
        self._changed()  # admissions change the load
        seconds = self.cost.prefill_step_seconds((st.slots.start, st.slots.end) for st in batch)
        deadline = start + seconds
        self._stepping = True
        try:
            await self.clock.sleep_until(deadline)
        finally:
            self._stepping = False
        self.steps += 1
        self.busy_sim_seconds += seconds
        self._finish_step(batch, wall_start + self.clock.real(seconds))
        for rid in sorted(self._deferred_aborts):
            self._abort_now(rid)
        self._deferred_aborts.clear()
        self._changed()
        return deadline

    def _finish_step(self, batch: list[ScheduledStep], ended_at: float) -> None:
        for st in batch:
            self.scheduler.commit(st)
        for st in batch:
            if not st.samples:
                continue
            req = st.req
            req.output_ids.append(output_tokens(req.prompt_ids, 1)[0])
            req.output_logprobs.append(0.0)
            req.finish(FinishReason.LENGTH)  # max_tokens = 1: the prefill's work ends here
            self.scheduler.finish(req)
            tracked = self._tracked.pop(req.rid, None)
            if tracked is None or tracked.future.done():
                continue
            admitted = tracked.admitted if tracked.admitted is not None else tracked.submitted
            tracked.future.set_result(
                PrefillOutcome(
                    rid=req.rid,
                    prompt_len=req.prompt_len,
                    first_token=req.output_ids[-1],
                    cached_tokens=req.cached_len,
                    queue_seconds=max(0.0, admitted - tracked.submitted),
                    prefill_seconds=max(0.0, ended_at - admitted),
                    finished_at=ended_at,
                )
            )

    # -- load ----------------------------------------------------------------------------------
    def _changed(self) -> None:
        s = self.scheduler
        self.load = EngineLoad(
            running=len(s.running),
            waiting=len(s.waiting),
            free_tokens=(self.full_pool.num_free + self.cache.evictable_full_pages()) * self.cfg.page_size,
            capacity_tokens=self.capacity_tokens,
            queued_tokens=sum(r.seq_len - r.computed_len for r in s.running + s.waiting if r.in_prefill),
        )
        for hook in self.on_change:
            try:
                hook(self)
            except Exception:  # noqa: BLE001 - a hook never takes the loop down
                log.exception("%s: on_change hook failed", self.name)
