"""Prefix-cache hit rate on a Mooncake trace with the engine's real bookkeeping, by KV tier layout.

SIMULATED bookkeeping, no tensors and no timing: the engine's real Scheduler, page pools, radix
cache and host tier (services/engine/kv/) serve the trace's requests one after another (prompts
built from the trace's hash ids, bench/replay/prompts.py), each request computing its prompt and
one token; what is counted is `cached_len` at admission, i.e. tokens whose KV a worker reuses.
Byte sizes are MiMo-V2-Flash's (bf16): full-attention KV 23,040 B/token, SWA KV 199,680 B/token.

--workers W workers (default 4) serve the trace, requests assigned round-robin (no cache-aware
routing: the case a shared L3 is for). Modes, all at the same device (L1) capacity per worker:
  L1 only                 the radix cache alone (window-safe: SWA kept only at cached tails)
  L1 + L2 window-safe     a host tier per worker: every page's full KV, SWA only as the window
                          before each cached end (kv/host_tier.py); its bytes split between full
                          pages and tails as one tail (W tokens of SWA) per mean prompt of full KV
  L1 + L2 all SWA         host tiers of the same bytes that keep every page's SWA KV with its
                          full KV (what a tier that is not window-aware stores): any page end is
                          restorable, but a page costs 9.7x the bytes
  L1 + L2 + L3 ...        plus one L3 shared by all workers (GCache), window-safe or all-SWA like
                          its L2, with the engine's flow (engine.py): everything written through
                          to L2 is written down to L3; a request whose prompt goes past what its
                          worker's L1 and L2 hold looks L3 up, installs the hit into L2 and is
                          restored from there at admission
Prompts continue earlier turns at the token level, as bench replay builds them by default
(bench/replay/prompts.py, `Continuations`): a conversation's next turn starts with the previous
prompt's exact tokens, so it reaches the end where a cache keeps the SWA tail. The ideal (infinite
cache) is bench/replay/ideal.py's token-exact one.

    python bench/kv_tier_hit_rate.py [--quick] [--trace PATH] [--requests N] [--prompt-scale F]
                                     [--workers 4] [--host-x 4 16] [--l3-x 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.replay.ideal import ideal_hit_tokens  # noqa: E402
from bench.replay.plan import Scaling, TraceSlice, plan  # noqa: E402
from bench.replay.prompts import Continuations, PromptBuilder  # noqa: E402
from bench.replay.traces import load_trace  # noqa: E402
from bench.sim.engine import SIM_PARAMS  # noqa: E402
from services.common.block_hash import BlockHash  # noqa: E402
from services.engine.kv.host_tier import HostHit, HostTier  # noqa: E402
from services.engine.kv.page_pool import PagePool  # noqa: E402
from services.engine.kv.radix_cache import RadixCache  # noqa: E402
from services.engine.queue_policy import make_queue_policy  # noqa: E402
from services.engine.request import Req  # noqa: E402
from services.engine.scheduler import Scheduler, SchedulerConfig  # noqa: E402

FULL_BYTES, SWA_BYTES = 23_040, 199_680  # MiMo-V2-Flash, bf16, per token (bench/sim/cost_model.py)
PAGE, WINDOW = 16, 128
DEFAULT_TRACE = ROOT.parent / "shared/traces/mooncake_fast25/conversation_trace.jsonl"


class AllSwaHostTier(HostTier):
    """A host tier that stores each page's SWA KV with its full KV (one combined page): any page
    end whose window's pages are all here is restorable. Same API, for the comparison only."""

    def __init__(self, pages: int) -> None:
        super().__init__(pages, 1, PAGE, WINDOW)
        self.need = -(-WINDOW // PAGE)

    def store_tail(self, key: BlockHash, n: int, parent: BlockHash | None = None, tokens=()) -> None:  # type: ignore[override]
        return None  # every page already carries its SWA

    def lookup(self, hashes: list[BlockHash], start: int) -> HostHit | None:  # type: ignore[override]
        full: list[int] = []
        end = start
        while end < len(hashes):
            page = self._full.get(hashes[end])
            if page is None:
                break
            full.append(page[0])
            end += 1
        while end > start and not all(self.has_full(h) for h in hashes[max(0, end - self.need) : end]):
            end -= 1
            full.pop()
        return HostHit(start, end, tuple(full), (), max(0, end - self.need)) if end > start else None


def _worker(device_tokens: int, host: HostTier | None) -> Scheduler:
    full_pool = PagePool(device_tokens // PAGE, PAGE, "full")
    swa_pool = PagePool(4 * (WINDOW // PAGE + 2), PAGE, "swa")  # one request at a time
    cache = RadixCache(PAGE, WINDOW, full_pool, swa_pool)
    return Scheduler(
        SchedulerConfig(page_size=PAGE, window=WINDOW, chunk_size=1 << 20, max_batch_tokens=1 << 20, max_running=1),
        full_pool, swa_pool, cache, make_queue_policy("fcfs"), host=host,
    )  # fmt: skip


def _l3_lookup(sched: Scheduler, l3: HostTier, req: Req) -> None:
    """The engine's staged L3 lookup (Engine._stage / _install_l3), as bookkeeping."""
    assert sched.host is not None
    beyond = sched.beyond_host(req)
    if beyond is None:
        return
    hashes, start, room = beyond
    got = l3.lookup(hashes[: start + room], start)
    if got is None:
        return
    l3.use(hashes, got)
    sched.host.install(hashes, got.start, got.end, req.all_ids)
    req.l3_span = (got.start, got.end)


def _write_down(sched: Scheduler, l3: HostTier) -> None:
    """What went to L2 this step goes to L3 (Engine._write_down_l3), as bookkeeping."""
    for job in sched.spills:
        if job.kind == "full":
            for key in job.keys:
                l3.store_full(key)
        else:
            l3.store_tail(job.keys[0], len(job.device))


def serve(
    requests: list[list[int]], device_tokens: int, hosts: list[HostTier | None], l3: HostTier | None = None
) -> tuple[int, int, int]:
    """Requests round-robin over len(hosts) workers; returns tokens cached in all, from L2, from L3."""
    workers = [_worker(device_tokens, h) for h in hosts]
    cached = l2 = from_l3 = 0
    for i, ids in enumerate(requests):
        sched = workers[i % len(workers)]
        req = Req(rid=f"r{i}", prompt_ids=ids, params=SIM_PARAMS)
        if l3 is not None:
            _l3_lookup(sched, l3, req)
        sched.add(req)
        while req.pages is None or req.computed_len < req.seq_len:
            batch = sched.schedule()
            if not batch:
                raise RuntimeError(f"request {i} ({len(ids)} tokens) does not fit the device pool")
            for st in batch:
                sched.commit(st)
            if l3 is not None:
                _write_down(sched, l3)
            sched.spills.clear()
        cached += req.cached_len
        l2 += req.cached_l2
        from_l3 += req.cached_l3
        req.restore = None
        req.output_ids.append(0)
        sched.finish(req)
        if l3 is not None:
            _write_down(sched, l3)
        sched.spills.clear()
    return cached, l2, from_l3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="400 requests (under a minute)")
    p.add_argument("--trace", default=str(DEFAULT_TRACE))
    p.add_argument("--requests", type=int, default=2000, help="the first N requests of the trace")
    p.add_argument("--prompt-scale", type=float, default=1.0, help="divide lengths and block size by this")
    p.add_argument(
        "--device-tokens", type=int, default=0, help="L1 tokens (default: 1.5 x the longest prompt)"
    )
    p.add_argument("--host-x", type=float, nargs="+", default=[4.0, 16.0],
                   help="L2 bytes per worker as multiples of a worker's L1 full-KV bytes (a row set each)")  # fmt: skip
    p.add_argument("--l3-x", type=float, default=64.0,
                   help="L3 bytes (shared) as multiples of one worker's L1 full-KV bytes")  # fmt: skip
    p.add_argument("--workers", type=int, default=4, help="workers, requests assigned round-robin")
    args = p.parse_args()
    if args.quick:
        args.requests, args.prompt_scale, args.host_x, args.l3_x = 400, 4.0, [4.0], 32.0
    planned = plan(
        load_trace(args.trace), TraceSlice(limit=args.requests), Scaling(prompt_scale=args.prompt_scale)
    )
    cont = Continuations.plan(planned)  # later turns continue earlier prompts, as bench replay builds them
    builder = PromptBuilder(seed=0, continuations=cont)
    prompts = [builder.token_ids(r) for r in planned]
    total = sum(len(x) for x in prompts)
    ideal = sum(ideal_hit_tokens(planned, cont.continued)) / total
    block = planned[0].block_size
    device = args.device_tokens or (max(len(x) for x in prompts) * 3 // 2 // PAGE + 1) * PAGE
    tail_bytes = WINDOW * SWA_BYTES
    share = tail_bytes / (tail_bytes + total / len(prompts) * FULL_BYTES)  # one tail per mean prompt
    rows = []
    w = args.workers

    def tier(kind: str, nbytes: float) -> tuple[HostTier, int]:
        """A window-safe or all-SWA tier of `nbytes`, and the full-KV tokens it holds."""
        if kind == "window-safe":
            full_pages = int((1 - share) * nbytes / (FULL_BYTES * PAGE))
            return HostTier(
                full_pages, int(share * nbytes / (SWA_BYTES * PAGE)), PAGE, WINDOW
            ), full_pages * PAGE
        all_pages = int(nbytes / ((FULL_BYTES + SWA_BYTES) * PAGE))
        return AllSwaHostTier(all_pages), all_pages * PAGE

    def size(nbytes: float, tokens: int) -> str:
        return f"{nbytes / 2**30:.1f} GiB = {tokens:,} tok"

    t = time.perf_counter()
    cached, _, _ = serve(prompts, device, [None] * w)
    rows.append(("L1 only", "-", "-", cached / total, 0.0, 0.0, time.perf_counter() - t))
    l3_bytes = args.l3_x * device * FULL_BYTES
    for x in args.host_x:
        host_bytes = x * device * FULL_BYTES
        for kind in ("window-safe", "all SWA"):
            for with_l3 in (False, True):
                tiers = [tier(kind, host_bytes) for _ in range(w)]
                l3, l3_tokens = tier(kind, l3_bytes) if with_l3 else (None, 0)
                t = time.perf_counter()
                cached, l2, from_l3 = serve(prompts, device, [h for h, _ in tiers], l3)
                name = f"L1 + L2{' + L3' if with_l3 else ''} {kind}"
                l3_size = size(l3_bytes, l3_tokens) if with_l3 else "-"
                rows.append((name, size(host_bytes, tiers[0][1]), l3_size, cached / total, l2 / total,
                             from_l3 / total, time.perf_counter() - t))  # fmt: skip
    print(f"\n## KV tiers: prefix hit rate, first {len(planned)} requests of {Path(args.trace).name} "
          f"(prompt scale {args.prompt_scale:g}: {total:,} tokens, block {block}), SIMULATED bookkeeping")  # fmt: skip
    print(f"{w} workers, round-robin; L1 {device:,} tokens ({device * FULL_BYTES / 2**30:.2f} GiB of full KV) per "
          f"worker in every mode; L2 per worker, L3 shared; window-safe tiers give {100 * share:.0f}% of their "
          f"bytes to tails; ideal (infinite cache) {100 * ideal:.1f}%")  # fmt: skip
    print("| mode | L2 per worker | L3 | hit rate | / ideal | from L2 | from L3 | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, l2_size, l3_size, hit, l2f, l3f, secs in rows:
        frac = hit / ideal if ideal else 0.0
        print(f"| {name} | {l2_size} | {l3_size} | {100 * hit:.1f}% | {frac:.2f} | {100 * l2f:.1f}% | "
              f"{100 * l3f:.1f}% | {secs:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
