"""Queue order on ONE simulated prefill worker, deterministically: the engine's real Scheduler, pools and
radix cache with the cost model's step times on a virtual clock (no processes, no wall clock, no router).

    .venv/bin/python -m bench.compare.queue_des --rate-scale 2 --chunk-size 16384 4096

The worker gets every request of a trace slice at `--rate-scale` (one worker of an 8-worker fleet at
rate scale X sees about X / 8 of the trace when routing keeps conversations together), prompts from the
trace's hash ids (equal id = equal 512-token block; window 0: every cached prefix resumable), and
reports P90 TTFT (prefill + KV transfer, simulated) of long and short requests for fcfs and
uncached-first, split by input length and by uncached tokens at admission, each at the fcfs run's
median: what queue order alone does, without the harness's run-to-run noise. SIMULATED.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.compare import analysis
from bench.replay.plan import PlannedRequest, Scaling, TraceSlice, plan
from bench.replay.prompts import block_take
from bench.replay.traces import load_trace
from bench.sim.cost_model import CostModel
from bench.sim.engine import SIM_PARAMS
from services.engine.kv.page_pool import PagePool
from services.engine.kv.radix_cache import RadixCache
from services.engine.queue_policy import make_queue_policy
from services.engine.request import FinishReason, Req
from services.engine.scheduler import Scheduler, SchedulerConfig


@dataclass(frozen=True)
class Arrival:
    at_s: float  # simulated seconds
    prompt_ids: tuple[int, ...]


def prompt_from_blocks(r: PlannedRequest) -> tuple[int, ...]:
    """Token ids of a trace request: block k of hash id h is ids h * B .. h * B + take - 1 (B = block
    size), so equal ids give equal blocks and a partial last block is a prefix of the full one."""
    ids: list[int] = []
    for k, h in enumerate(r.hash_ids):
        ids += range(h * r.block_size, h * r.block_size + block_take(r, k))
    return tuple(ids)


def simulate(
    arrivals: Sequence[Arrival],
    policy: str,
    *,
    chunk_size: int = 16384,
    max_batch_tokens: int = 16384,
    capacity_tokens: int = 1 << 20,
    page_size: int = 16,
    window: int = 0,
    cost: CostModel | None = None,
) -> list[dict[str, object]]:
    """Rows as a --detailed replay has them (input_length, cached_tokens, ttft_ms, ok), in arrival order."""
    cost = cost or CostModel()
    clock = [0.0]
    full = PagePool(capacity_tokens // page_size, page_size, "full")
    swa = PagePool(2 * 128 * (math.ceil(max(window, 1) / page_size) + 2), page_size, "swa")
    cache = RadixCache(page_size, window, full, swa)
    cfg = SchedulerConfig(page_size=page_size, window=window, chunk_size=chunk_size,
                          max_batch_tokens=max_batch_tokens, max_running=128)  # fmt: skip
    sched = Scheduler(cfg, full, swa, cache, make_queue_policy(policy), lambda: clock[0])
    order = sorted(range(len(arrivals)), key=lambda i: arrivals[i].at_s)
    reqs: dict[str, tuple[int, Req]] = {}
    rows: list[dict[str, object] | None] = [None] * len(arrivals)
    nxt = 0
    while nxt < len(order) or sched.has_work():
        if not sched.has_work():
            clock[0] = max(clock[0], arrivals[order[nxt]].at_s)
        while nxt < len(order) and arrivals[order[nxt]].at_s <= clock[0]:
            i = order[nxt]
            req = Req(
                rid=str(i),
                prompt_ids=list(arrivals[i].prompt_ids),
                params=SIM_PARAMS,
                arrival=arrivals[i].at_s,
            )
            reqs[req.rid] = (i, req)
            sched.add(req)
            nxt += 1
        batch = sched.schedule()
        if not batch:
            raise RuntimeError("the worker cannot admit the head of its queue (capacity too small)")
        clock[0] += cost.prefill_step_seconds((st.slots.start, st.slots.end) for st in batch)
        for st in batch:
            sched.commit(st)
        for st in batch:
            if not st.samples:
                continue
            req = st.req
            req.output_ids.append(0)
            req.finish(FinishReason.LENGTH)
            sched.finish(req)
            i, _ = reqs.pop(req.rid)
            ttft = clock[0] - req.arrival + cost.kv_transfer_seconds(req.prompt_len)
            rows[i] = {"index": i, "ok": True, "input_length": req.prompt_len, "cached_tokens": req.cached_len,
                       "ttft_ms": 1000 * ttft}  # fmt: skip
    return [r for r in rows if r is not None]


def workload(trace: Path, start: float, duration: float, rate_scale: float) -> list[Arrival]:
    planned = plan(load_trace(trace), TraceSlice(start, duration), Scaling(rate_scale=rate_scale))
    return [Arrival(r.send_at_s, prompt_from_blocks(r)) for r in planned]


def compare(arrivals: Sequence[Arrival], chunk_size: int) -> list[str]:
    """Markdown rows: per split, uncached-first and fcfs, long and short P90 at the fcfs run's median."""
    runs = {p: simulate(arrivals, p, chunk_size=chunk_size) for p in ("uncached-first", "fcfs")}
    lines = []
    for by in analysis.SPLITS:
        t = analysis.median_length(runs["fcfs"], by)
        uf, fc = (analysis.split_p90(runs[p], t, by) for p in ("uncached-first", "fcfs"))
        cut, rise = (g.value for g in analysis.queue_goals(uf, fc, ""))
        lines.append(
            f"| {chunk_size} | {analysis.SPLIT_LABELS[by]} | {t:,.0f} | {uf.long_p90_ms:,.0f} | {fc.long_p90_ms:,.0f} "
            f"| {cut:+.1f}% | {uf.short_p90_ms:,.0f} | {fc.short_p90_ms:,.0f} | {rise:+.1f}% |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path,
                   default=root.parent / "shared/traces/mooncake_fast25/conversation_trace.jsonl")  # fmt: skip
    p.add_argument("--start", type=float, default=0.0)
    p.add_argument("--duration", type=float, default=400.0)
    p.add_argument("--rate-scale", type=float, nargs="+", default=[2.0])
    p.add_argument("--chunk-size", type=int, nargs="+", default=[16384])
    a = p.parse_args(argv)
    print("SIMULATED: one prefill worker, the real Scheduler on a virtual clock (cost model of MiMo-V2-Flash "
          f"on 8 x H200), {a.trace.name} {a.start:g}-{a.start + a.duration:g} s, window 0, step budget 16384")  # fmt: skip
    for x in a.rate_scale:
        arrivals = workload(a.trace, a.start, a.duration, x)
        busy = sum(CostModel().prefill_seconds(len(r.prompt_ids)) for r in arrivals)
        span = max(r.at_s for r in arrivals) - min(r.at_s for r in arrivals)
        print(f"\nrate scale {x:g}: {len(arrivals)} requests over {span:.0f} s, uncached work {busy / span:.0%} "
              "of the worker (before cache hits)\n")  # fmt: skip
        print("| chunk | split by | threshold | long P90 uf ms | long P90 fcfs ms | long cut | short P90 uf ms "
              "| short P90 fcfs ms | short change |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|")
        for c in a.chunk_size:
            print("\n".join(compare(arrivals, c)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
