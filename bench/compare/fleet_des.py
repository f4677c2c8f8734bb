"""Routing policies on a SIMULATED fleet, deterministically: N prefill workers (the engine's real
Scheduler, pools and window-safe radix cache, the cost model's step times) on one virtual clock,
in front of them our real RoutingPipeline with a real PrefixIndex fed by the workers' KV events,
and routing-time residency recorded as the router records it. No processes, no wall clock: the
same command gives the same table on any machine, whatever else runs there, so a sweep of the
seed's options is decided by the policy and not by the machine's noise (bench/compare_routers.py
runs the live fleets; this is how its default was chosen: docs/router.md).

    .venv/bin/python -m bench.compare.fleet_des --quick
    .venv/bin/python -m bench.compare.fleet_des --trace T.jsonl --workers 8 32 --window 0 128 \\
        --variant seed= --variant 'sticky=--saturation-s 1'

What the router sees, as live: loads of each worker as it last changed (the registry pushes them
within milliseconds), KV events `--event-delay-ms` after the step that made them, its own pending
entries at once. Prompts are the bench's continued prompts (bench/replay/prompts.py), arrivals the
trace's times / `--rate-scale`. Reported per variant: token hit rate (and as a share of the trace's
ideal), P90/P50 TTFT (queue + prefill + KV transfer, simulated), the share of "load over cache"
decisions, and the router's prediction error (|predicted - actual cached| / prompt tokens, phantom
hits). Each worker's prefill queue runs fcfs (routing alone is compared).
"""

from __future__ import annotations

import argparse
import heapq
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.replay.ideal import ideal_hit_tokens
from bench.replay.plan import Scaling, TraceSlice, plan
from bench.replay.prompts import Continuations, PromptBuilder
from bench.replay.traces import load_trace
from bench.sim.cost_model import CostModel
from bench.sim.engine import SIM_PARAMS
from services.common.kv_event_wire import ops_from_events
from services.common.kv_events import EventBuffer
from services.common.prefix_index import PrefixIndex
from services.engine.bookkeeping import BookkeepingConfig, build_bookkeeping
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import RadixCache
from services.engine.request import FinishReason, Req
from services.engine.scheduler import Scheduler
from services.router.policy import Candidate, PolicyConfig
from services.router.policy.config import add_policy_args, policy_config_from_args
from services.router.residency import RoutedResidency
from services.router.routing import RoutingPipeline

PAGE = 16


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Worker:
    wid: str
    sched: Scheduler
    cache: RadixCache
    full: PagePool
    events: EventBuffer
    tps: float
    capacity: int
    busy_until: float | None = None  # the running step's end
    batch: list = field(default_factory=list)  # type: ignore[type-arg]

    def candidate(self) -> Candidate:
        s = self.sched
        queued = sum(r.seq_len - r.computed_len for r in s.running + s.waiting if r.in_prefill)
        free = (self.full.num_free + self.cache.evictable_full_pages()) * PAGE
        return Candidate(self.wid, self.wid, queued_tokens=queued, capacity_tokens=self.capacity,
                         free_kv_tokens=free, tokens_per_s=self.tps, has_load=True,
                         running=len(s.running), waiting=len(s.waiting))  # fmt: skip


class IndexSource:
    def __init__(self, index: PrefixIndex) -> None:
        self.index = index
        self.ready = True
        self.redis_ok = True


@dataclass
class Result:
    hit: float
    ideal: float
    p50_ms: float
    p90_ms: float
    load_over_cache: float
    mae: float  # |predicted - actual| cached tokens / prompt tokens
    phantom: float  # share of requests predicted > 0, actual 0
    imbalance: float  # busiest worker's busy time / the mean
    placed: dict[int, int] = field(default_factory=dict)  # arrival index -> prefill worker
    cached: dict[int, int] = field(default_factory=dict)  # arrival index -> cached tokens


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] if xs else 0.0


def simulate(
    arrivals: Sequence[tuple[float, list[int]]],
    config: PolicyConfig,
    workers: int,
    window: int,
    *,
    capacity_tokens: int = 1 << 20,
    chunk_size: int = 16384,
    event_delay_s: float = 0.005,
    load_gap_s: float = 0.05,
    ideal: float = 0.0,
    cost: CostModel | None = None,
    scale: int = 1,
) -> Result:
    """`scale` > 1: each worker is `scale` engines in one (pools, batch, chunk and speed times
    `scale`): with workers=1 and scale=N, one cache of an N-worker fleet's size (`--one-engine`)."""
    cost = cost or CostModel()
    clock = Clock()
    index = PrefixIndex(PAGE, window)
    index.clock = clock
    pipe = RoutingPipeline(config, IndexSource(index))
    residency = RoutedResidency(config, index, clock=clock) if config.pending else None
    tps = cost.prefill_tokens_per_s() * scale
    fleet: list[Worker] = []
    for i in range(workers):
        bk = build_bookkeeping(
            BookkeepingConfig(
                page_size=PAGE, window=window, max_total_tokens=scale * capacity_tokens,
                swa_pages=scale * 2 * 256 * (math.ceil(max(window, 1) / PAGE) + 2),
                chunk_size=scale * chunk_size, max_batch_tokens=scale * chunk_size, max_running=256 * scale,
            ),
            clock,
        )  # fmt: skip
        fleet.append(
            Worker(f"w{i}", bk.scheduler, bk.cache, bk.full_pool, bk.events, tps, scale * capacity_tokens)
        )
    decode = [
        Candidate("d", "d", role="decode", free_kv_tokens=1 << 30, capacity_tokens=1 << 30, has_load=True)
    ]
    # the event queue: (time, order, kind, payload)
    q: list[tuple[float, int, str, object]] = []
    n = 0
    for at, ids in arrivals:
        heapq.heappush(q, (at, n, "arrive", (n, ids)))
        n += 1
    seq = n
    rows: dict[str, tuple[float, int, int, str]] = {}  # rid -> (arrival, predicted, prompt_len, reason)
    ttft: list[float] = []
    cached = total = 0
    abs_err = 0
    phantom = 0
    reasons: dict[str, int] = {}
    busy = [0.0] * workers
    placed: dict[int, int] = {}
    cached_by: dict[int, int] = {}
    seen: list[tuple[float, Candidate] | None] = [None] * workers  # the registry's last record of each

    def loads() -> list[Candidate]:
        """What the registry says: a worker publishes at once when it turns idle, else at most
        every `load_gap_s` (services/common/registry.py)."""
        out = []
        for k, w in enumerate(fleet):
            held = seen[k]
            idle = not w.sched.running and not w.sched.waiting
            if held is None or idle or clock.t - held[0] >= load_gap_s:
                held = seen[k] = (clock.t, replace(w.candidate(), updated_at=clock.t))
            out.append(held[1])
        return out

    def start_step(w: Worker, k: int) -> None:
        nonlocal seq
        batch = w.sched.schedule()
        if not batch:
            w.busy_until = None
            return
        secs = cost.prefill_step_seconds((st.slots.start, st.slots.end) for st in batch) / scale
        busy[k] += secs
        w.batch, w.busy_until = batch, clock.t + secs
        heapq.heappush(q, (w.busy_until, seq, "step", k))
        seq += 1

    while q:
        t, _, kind, payload = heapq.heappop(q)
        clock.t = t
        if kind == "arrive":
            i, ids = payload  # type: ignore[misc]
            prompt = pipe.prepare(ids)
            d = pipe.decide(prompt, loads(), decode)
            rid = f"r{i}"
            if residency is not None and d.reason not in ("index_unavailable", "no_index"):
                residency.record(rid, d, prompt)
            reasons[d.reason] = reasons.get(d.reason, 0) + 1
            k = int(d.prefill.worker_id[1:])
            placed[i] = k
            w = fleet[k]
            rows[rid] = (t, d.safe_match_tokens, len(ids), d.reason)
            w.sched.add(Req(rid=rid, prompt_ids=list(ids), params=SIM_PARAMS, arrival=t))
            if w.busy_until is None:
                start_step(w, k)
        elif kind == "step":
            k = payload  # type: ignore[assignment]
            w = fleet[k]  # type: ignore[index]
            for st in w.batch:
                w.sched.commit(st)
            for st in w.batch:
                if not st.samples:
                    continue
                req = st.req
                req.output_ids.append(0)
                req.finish(FinishReason.LENGTH)
                w.sched.finish(req)
                arrived, predicted, plen, _ = rows.pop(req.rid)
                ttft.append(t - arrived + cost.kv_transfer_seconds(plen))
                cached += req.cached_len
                cached_by[int(req.rid[1:])] = req.cached_len
                total += plen
                abs_err += abs(predicted - req.cached_len)
                phantom += predicted > 0 and req.cached_len == 0
            ops = ops_from_events(w.events.drain())
            if ops:
                heapq.heappush(q, (t + event_delay_s, seq, "events", (w.wid, ops)))
                seq += 1
            start_step(w, k)  # type: ignore[arg-type]
        else:  # KV events reach the index
            source: str = payload[0]  # type: ignore[index]
            for o in payload[1]:  # type: ignore[index]
                if o.op == "clear":
                    index.clear(source)
                elif o.op == "store":
                    index.store(source, o.kind, o.hashes)
                else:
                    index.remove(source, o.kind, o.hashes)
    done = len(ttft)
    mean_busy = sum(busy) / len(busy) if busy else 0.0
    return Result(
        hit=cached / total if total else 0.0,
        ideal=ideal,
        p50_ms=1000 * _p(ttft, 0.5),
        p90_ms=1000 * _p(ttft, 0.9),
        load_over_cache=reasons.get("load_over_cache", 0) / max(1, done),
        mae=abs_err / total if total else 0.0,
        phantom=phantom / max(1, done),
        imbalance=max(busy) / mean_busy if mean_busy else 1.0,
        placed=placed,
        cached=cached_by,
    )


def workload(
    trace: Path, start: float, duration: float, rate_scale: float
) -> tuple[list[tuple[float, list[int]]], float]:
    """Arrivals (simulated seconds, token ids) of the slice, continued prompts; and the ideal hit rate."""
    planned = plan(load_trace(trace), TraceSlice(start, duration), Scaling(rate_scale=rate_scale))
    cont = Continuations.plan(planned)
    builder = PromptBuilder(seed=0, continuations=cont)
    prompts = [builder.token_ids(r) for r in planned]
    total = sum(len(p) for p in prompts)
    ideal = sum(ideal_hit_tokens(planned, cont.continued)) / total if total else 0.0
    return [(r.send_at_s, p) for r, p in zip(planned, prompts, strict=True)], ideal


def variant_config(flags: str, window: int) -> PolicyConfig:
    """A PolicyConfig from router flags, as the router parses them (the window given here)."""
    p = argparse.ArgumentParser()
    add_policy_args(p)
    return policy_config_from_args(p.parse_args(shlex.split(flags) + ["--kv-window", str(window)]))


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, nargs="+",
                   default=[root.parent / "shared/traces/mooncake_fast25/conversation_trace.jsonl"])  # fmt: skip
    p.add_argument("--start", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=400.0)
    p.add_argument("--rate-scale", type=float, nargs="+", default=[8.0])
    p.add_argument("--workers", type=int, nargs="+", default=[8])
    p.add_argument("--window", type=int, nargs="+", default=[128, 0])
    p.add_argument("--event-delay-ms", type=float, default=5.0)
    p.add_argument("--load-gap-ms", type=float, default=50.0, help="a busy worker's loads reach the router this often")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=ROUTER FLAGS (repeat); default: the seed as shipped, and without pending")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="one trace, 8 workers, a 120 s slice")
    p.add_argument("--one-engine", action="store_true",
                   help="add a reference row per cell: one engine with the whole fleet's KV and speed (no routing)")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.duration, a.workers = 120.0, [8]
    variants = [v.partition("=")[::2] for v in a.variant] or [
        ("seed", ""),
        ("seed-no-pending", "--no-pending"),
    ]
    print("SIMULATED: our RoutingPipeline + PrefixIndex over N prefill workers (real Scheduler and radix cache, "
          "cost model of MiMo-V2-Flash on 8 x H200) on a virtual clock; fcfs queues; deterministic.")  # fmt: skip
    lines = ["| trace | workers | X | window | variant | hit | % of ideal | P50 TTFT ms | P90 TTFT ms "
             "| load over cache | pred. error | phantom | imbalance |", "|" + "---|" * 13]  # fmt: skip
    for trace in a.trace:
        for x in a.rate_scale:
            arrivals, ideal = workload(trace, a.start, a.duration, x)
            for nw in a.workers:
                for win in a.window:
                    runs = [(name, flags, nw, 1) for name, flags in variants]
                    if a.one_engine:
                        runs.append((f"one engine ({nw}x)", "", 1, nw))
                    for name, flags, workers, scale in runs:
                        r = simulate(arrivals, variant_config(flags, win), workers, win, ideal=ideal, scale=scale,
                                     event_delay_s=a.event_delay_ms / 1000, load_gap_s=a.load_gap_ms / 1000)  # fmt: skip
                        line = (f"| {trace.stem} | {nw} | {x:g} | {win} | {name} | {r.hit:.1%} | "
                                f"{r.hit / ideal if ideal else 0:.1%} | {r.p50_ms:,.0f} | {r.p90_ms:,.0f} | "
                                f"{r.load_over_cache:.1%} | {r.mae:.2%} | {r.phantom:.2%} | {r.imbalance:.2f} |")  # fmt: skip
                        lines.append(line)
                        print(line, flush=True)
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
