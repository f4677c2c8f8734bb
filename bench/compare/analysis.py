"""Pure figures of the comparison: the long/short split, the goals, the capacity bound, the table.

Everything here takes plain rows and summaries (dicts as bench/compare/run.py writes them), so the
tests can feed it hand-made data.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.replay.figures import percentile
from bench.replay.ideal import record, shared_prefix
from bench.replay.plan import PlannedRequest
from bench.replay.prompts import NO_CONTINUATIONS, Continuations

Row = dict[str, Any]  # one request of a --detailed replay JSON
Summary = dict[str, Any]  # one run, as bench.compare.run.summarize returns it


# -- long and short requests ----------------------------------------------------------------------
def uncached_tokens(row: Row) -> int:
    """Prompt tokens the prefill worker computed: input minus what its cache held at admission."""
    return int(row["input_length"]) - int(row.get("cached_tokens") or 0)


# How a request's size is measured for the long/short split: its input length (the goal's wording), or
# the tokens left to compute when it was admitted (what uncached-first orders by: a long prompt that is
# mostly cached is cheap). The uncached split uses each run's own cache hits.
SPLITS = {"input": lambda r: float(r["input_length"]), "uncached": lambda r: float(uncached_tokens(r))}
SPLIT_LABELS = {"input": "input length", "uncached": "uncached tokens at admission"}


def median_length(rows: Sequence[Row], by: str = "input") -> float:
    """Median size (`by`: input or uncached) of the requests: the long/short threshold. Input length
    over every request sent (ok or not); uncached tokens over the successful ones (a failed request
    reports no cache hit)."""
    size = SPLITS[by]
    return percentile([size(r) for r in rows if by == "input" or r["ok"]], 50)


@dataclass(frozen=True)
class SplitP90:
    threshold: float  # long: size > threshold; short: <= threshold
    long_p90_ms: float
    short_p90_ms: float
    long_count: int
    short_count: int
    by: str = "input"  # the size: input length or uncached tokens at admission (SPLITS)


def split_p90(rows: Sequence[Row], threshold: float, by: str = "input") -> SplitP90:
    """P90 TTFT of the successful requests above and at-or-below `threshold` tokens of size `by`."""
    size = SPLITS[by]
    long = [r["ttft_ms"] for r in rows if r["ok"] and size(r) > threshold]
    short = [r["ttft_ms"] for r in rows if r["ok"] and size(r) <= threshold]
    return SplitP90(threshold, percentile(long, 90), percentile(short, 90), len(long), len(short), by)


def long_cheap_p90(
    rows: Sequence[Row], input_threshold: float, uncached_threshold: float
) -> tuple[float, int]:
    """(P90 TTFT, count) of the successful requests long by input length but short by uncached tokens at
    admission: long prompts mostly cached, the class uncached-first moves ahead of costlier ones."""
    ttft = [
        r["ttft_ms"]
        for r in rows
        if r["ok"] and r["input_length"] > input_threshold and uncached_tokens(r) <= uncached_threshold
    ]
    return percentile(ttft, 90), len(ttft)


# -- goals --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Goal:
    name: str
    scope: str  # which runs it was judged on
    value: float  # measured
    target: float  # value must be >= target (higher_is_better) or <= target
    higher_is_better: bool = True
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def margin(self) -> float:
        """Positive when met, negative when missed, in the goal's unit."""
        return self.value - self.target if self.higher_is_better else self.target - self.value

    def line(self) -> str:
        verdict = "MET" if self.met else "MISSED"
        cmp = ">=" if self.higher_is_better else "<="
        u = self.unit
        points = " points" if u == "%" else u
        return (
            f"- {verdict}: {self.name} [{self.scope}]: {self.value:.3g}{u} (goal {cmp} {self.target:.3g}{u}, "
            f"margin {self.margin:+.3g}{points})"
        )


def _find(summaries: Iterable[Summary], policy: str) -> Summary | None:
    return next((s for s in summaries if s["policy"] == policy and s.get("completed")), None)


def group_goals(summaries: Sequence[Summary], scope: str, swaserve: str = "swaserve-seed") -> list[Goal]:
    """Goals judged on one (trace, workers, rate) group of the main table; skipped when a run is missing."""
    goals: list[Goal] = []
    ours, rr, sg = (
        _find(summaries, swaserve),
        _find(summaries, "round-robin"),
        _find(summaries, "sglang-cache-aware"),
    )
    if ours is None:
        return goals
    workers = ours["workers"]
    if workers == 8 and ours["hit_ratio"] is not None:
        goals.append(Goal(f"{swaserve} hit rate / ideal", scope, 100 * ours["hit_ratio"], 90.0, unit="%"))
    if workers == 8 and rr is not None and rr["hit_rate"]:
        gain = 100 * (ours["hit_rate"] / rr["hit_rate"] - 1)
        goals.append(Goal(f"{swaserve} hit rate over round-robin", scope, gain, 25.0, unit="%"))
    if sg is not None and sg["p90_ttft_ms"]:
        cut = 100 * (1 - ours["p90_ttft_ms"] / sg["p90_ttft_ms"])
        goals.append(Goal(f"{swaserve} P90 TTFT below sglang cache_aware", scope, cut, 30.0, unit="%"))
    if (ratio := cpu_ratio(ours, sg)) is not None:
        goals.append(
            Goal(f"{swaserve} router CPU per request / sglang-router's", scope, ratio, 2.0, False, "x")
        )
    return goals


def cpu_ratio(s: Summary, sglang: Summary | None) -> float | None:
    """Router CPU per request of run `s` over sglang-router's (cache_aware) in the same table."""
    if sglang is None or s.get("error") or not sglang.get("router_cpu_ms_per_req"):
        return None
    return float(s["router_cpu_ms_per_req"]) / float(sglang["router_cpu_ms_per_req"])


REPLICA_POINTS = 1.0  # hit rate with N router replicas may fall at most this many points below one's


def replica_goals(summaries: Sequence[Summary], scope: str) -> list[Goal]:
    """Per policy, the hit rate with the most router replicas against one replica (same trace, fleet, rate)."""
    goals: list[Goal] = []
    for policy in dict.fromkeys(s["policy"] for s in summaries if s.get("completed")):
        runs = sorted((s for s in summaries if s["policy"] == policy and s.get("completed")),
                      key=lambda s: s.get("router_replicas", 1))  # fmt: skip
        one, many = runs[0], runs[-1]
        if one.get("router_replicas", 1) != 1 or many.get("router_replicas", 1) == 1:
            continue
        n = many["router_replicas"]
        diff = 100 * (many["hit_rate"] - one["hit_rate"])
        goals.append(
            Goal(f"{policy} hit rate, {n} router replicas vs 1", scope, diff, -REPLICA_POINTS, unit="%")
        )
    return goals


def queue_goals(uncached_first: SplitP90, fcfs: SplitP90, scope: str) -> list[Goal]:
    cut = 100 * (1 - uncached_first.long_p90_ms / fcfs.long_p90_ms)
    rise = 100 * (uncached_first.short_p90_ms / fcfs.short_p90_ms - 1)
    return [
        Goal("uncached-first cuts long requests' P90 TTFT vs fcfs", scope, cut, 30.0, unit="%"),
        Goal("uncached-first raises short requests' P90 TTFT vs fcfs", scope, rise, 0.0, False, unit="%"),
    ]


# -- what the fleet's capacity allows -------------------------------------------------------------
def lru_bound(
    planned: Sequence[PlannedRequest], capacity_tokens: int, cont: Continuations = NO_CONTINUATIONS
) -> float:
    """Hit rate of ONE LRU cache of `capacity_tokens` (the whole fleet's) over the requests in order,
    blocks as the trace's hash ids, every request seen at once: what any router could reach at most
    with that much KV (per-worker caches only lose to it: duplicates, imbalance, partitioning).
    Hits as bench.replay.ideal counts them (token-exact; a continued prompt counts whole while the
    block it ends in is cached), so with no eviction it equals the ideal."""
    cache: OrderedDict[int, int] = OrderedDict()  # hash id -> most tokens of it cached
    hits = total = 0
    for k, r in enumerate(planned):
        if not r.hash_ids:
            continue
        hit = shared_prefix(r, cache)
        if cont.continued and cont.continued[k]:  # its first new block inherits an earlier last block
            i = cont.continued[k] // r.block_size  # continued = i * block + n, n < block
            if hit >= i * r.block_size and cont.inherit[r.hash_ids[i]][0] in cache:
                hit = max(hit, cont.continued[k])
        hits += hit
        total += r.input_length
        record(r, cache)
        for h in r.hash_ids:
            cache.move_to_end(h)
        while len(cache) * r.block_size > capacity_tokens:
            cache.popitem(last=False)
    return hits / total if total else 0.0


# -- the table ----------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ms(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _cpu(ms_per_req: float | None, util: float | None) -> str:
    if ms_per_req is None:
        return "n/a"
    return f"{ms_per_req:.1f} ({100 * (util or 0):.0f}%)"


TABLE_HEAD = (
    "| policy | K | hit rate | hit / ideal | TTFT mean ms | P90 ms | P99 ms | req/s | input tok/s "
    "| imbalance | router CPU ms/req (core) | router CPU / sglang's | fleet CPU ms/req (core) | other CPU "
    "| failed |"
)


def table_row(s: Summary, sglang: Summary | None = None) -> str:
    """One run's row; `sglang`: the table's sglang-router cache_aware run (the router-CPU ratio's base)."""
    if s.get("error"):
        return f"| {s['policy']} | | run failed: {s['error'][:80]} | | | | | | | | | | | | |"
    k = s["workload"]["time_scale"]
    cells = [
        s["policy"], f"{k:g}", _pct(s["hit_rate"]), _pct(s["hit_ratio"]), _ms(s["mean_ttft_ms"]),
        _ms(s["p90_ttft_ms"]), _ms(s["p99_ttft_ms"]), f"{s['request_throughput']:.2f}",
        f"{s['input_throughput']:,.0f}", _ratio(s.get("backlog_imbalance")), _cpu(s["router_cpu_ms_per_req"], s["router_core_util"]),
        _ratio(cpu_ratio(s, sglang)), _cpu(s["fleet_cpu_ms_per_req"], s["fleet_core_util"]), _ratio(s.get("other_cpu_cores")),
        f"{s['failed']}/{s['sent']}",
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def format_table(summaries: Sequence[Summary]) -> str:
    sep = "|" + "---|" * TABLE_HEAD.count(" | ") + "---|"
    sglang = _find(summaries, "sglang-cache-aware")
    return "\n".join([TABLE_HEAD, sep, *(table_row(s, sglang) for s in summaries)])


# -- where the missing hits went ----------------------------------------------------------------
def hit_loss(
    rows: Sequence[Row],
    hash_ids: Mapping[int, Sequence[int]],
    block: int,
    inherit: Mapping[int, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Split the prompt tokens the ideal hits but the run did not into two kinds, as fractions of all
    prompt tokens of the successful requests:

      in_flight   every earlier request holding the prefix was still before its first token when
                  this one was sent: not in any cache yet (only a router that queues it behind
                  that request on the same worker can still turn it into a hit);
      available   some earlier request had finished its prefill: the prefix was cached somewhere
                  (unless evicted) and routing sent this request elsewhere, or it was evicted.

    `hash_ids` maps a row's trace index to its blocks; times are the rows' (trace time). `inherit`
    (Continuations.inherit): a hit that ends in a block continuing an earlier prompt is ready when
    that prompt's last block is."""
    ok = sorted((r for r in rows if r["ok"]), key=lambda r: r["started_s"])
    done_at: dict[int, float] = {}  # hash id at position k-1 -> earliest prefill end of a request holding it
    total = in_flight = available = 0.0
    for r in ok:
        ids = hash_ids[r["index"]]
        total += r["input_length"]
        lost = max(0, r["ideal_hit_tokens"] - (r["cached_tokens"] or 0))
        k = -(-r["ideal_hit_tokens"] // block)  # blocks the ideal counts
        if lost and k:
            last = ids[k - 1]
            if last not in done_at and inherit and last in inherit:
                last = inherit[last][0]  # a continuation: the earlier prompt's last block
            ready = done_at.get(last, math.inf)
            if ready <= r["started_s"]:
                available += lost
            else:
                in_flight += lost
        end = r["started_s"] + r["ttft_ms"] / 1000.0
        for h in ids:
            done_at[h] = min(done_at.get(h, math.inf), end)
    return {
        "in_flight": in_flight / total if total else 0.0,
        "available": available / total if total else 0.0,
    }
