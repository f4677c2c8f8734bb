"""The comparison's report: goals, the queue-policy split, and one table per group of runs (markdown).

`a` is compare_routers' resolved argument namespace (slice, scaling, `base_rates` per trace);
`results` its JSON (runs by key); `sections` the planned runs by section name.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

from bench.compare import accuracy, analysis
from bench.compare.run import RunSpec
from bench.replay.ideal import ideal_hit_rate
from bench.replay.plan import PlannedRequest, Scaling, TraceSlice, plan
from bench.replay.prompts import NO_CONTINUATIONS, Continuations
from bench.replay.traces import load_trace

OUR_PRESETS = ("swaserve-seed", "swaserve-affinity")  # judged against the goals when in a table


def queue_split(results: dict[str, Any], runs: list[RunSpec]) -> dict[str, Any] | None:
    """Long/short P90 TTFT of the uncached-first and the fcfs run, split by input length and by uncached
    tokens at admission (analysis.SPLITS), each at the fcfs run's median (one threshold for both runs)."""
    s = [results["runs"].get(r.key, {}) for r in runs]
    if any(x.get("error") or "replay_json" not in x for x in s):
        return None
    rows = [json.loads(Path(x["replay_json"]).read_text())["requests"] for x in s]
    splits: list[dict[str, Any]] = []
    thresholds = {by: analysis.median_length(rows[1], by) for by in analysis.SPLITS}
    for by, threshold in thresholds.items():
        uf, fc = (analysis.split_p90(r, threshold, by) for r in rows)
        splits.append({"by": by, "threshold": threshold, "uncached-first": vars(uf), "fcfs": vars(fc)})
    t_in, t_unc = thresholds["input"], thresholds["uncached"]
    cheap = {
        k: analysis.long_cheap_p90(r, t_in, t_unc)
        for k, r in zip(("uncached-first", "fcfs"), rows, strict=True)
    }
    return {"splits": splits, "long_cheap": {k: {"p90_ms": v[0], "count": v[1]} for k, v in cheap.items()}}


def group_header(a: argparse.Namespace, runs: list[RunSpec]) -> str:
    r = runs[0]
    rates = sorted({x.workload.rate_scale for x in runs})
    offered = ", ".join(f"{a.base_rates[r.workload.trace] * x:.1f}" for x in rates)
    planned, cont = _planned(a, r)
    cap = r.fleet.workers * r.fleet.capacity_tokens
    bound = analysis.lru_bound(planned, cap, cont)
    builder = (
        "turns continue earlier prompts" if r.workload.prompt_blocks == "continue" else "ids-only prompts"
    )
    return (
        f"{r.workload.trace_name} trace, {r.fleet.workers} prefill workers, rate scale "
        f"{', '.join(f'{x:g}' for x in rates)} ({offered} req/s offered), sim window "
        f"{r.fleet.window}, {builder}; ideal hit rate {100 * ideal_hit_rate(planned, cont.continued):.1f}%, "
        f"one LRU cache of the fleet's {cap / 2**20:.0f}Mi tokens {100 * bound:.1f}%"
    )


def _planned(a: argparse.Namespace, r: RunSpec) -> tuple[tuple[PlannedRequest, ...], Continuations]:
    """The run's requests, at its prompt scale, and their continuations (planned once per slice)."""
    w = r.workload
    return _plan_slice(w.trace, a.start, a.duration, w.prompt_scale, w.prompt_blocks)


@functools.lru_cache(maxsize=16)
def _plan_slice(
    trace: Path, start: float, duration: float, prompt_scale: float, prompt_blocks: str
) -> tuple[tuple[PlannedRequest, ...], Continuations]:
    planned = tuple(plan(load_trace(trace), TraceSlice(start, duration), Scaling(prompt_scale=prompt_scale)))
    return planned, Continuations.plan(planned) if prompt_blocks == "continue" else NO_CONTINUATIONS


def add_hit_loss(a: argparse.Namespace, sections: dict[str, list[RunSpec]], results: dict[str, Any]) -> None:
    """Each run's missed hits, split into prefixes still in flight and prefixes already cached (JSON only)."""
    blocks: dict[Path, dict[int, tuple[int, ...]]] = {}
    for run in {r.key: r for runs in sections.values() for r in runs}.values():
        s = results["runs"].get(run.key, {})
        if "replay_json" not in s or not Path(s["replay_json"]).exists():
            continue
        trace = run.workload.trace
        if trace not in blocks:
            blocks[trace] = {i: r.hash_ids for i, r in enumerate(load_trace(trace).requests)}
        rows = json.loads(Path(s["replay_json"]).read_text())["requests"]
        block = Scaling(prompt_scale=run.workload.prompt_scale).block_size(512)  # as _planned's
        inherit = _planned(a, run)[1].inherit
        s["hit_loss"] = analysis.hit_loss(rows, blocks[trace], block, inherit)


def report(a: argparse.Namespace, sections: dict[str, list[RunSpec]], results: dict[str, Any]) -> str:
    runs = results["runs"]
    add_hit_loss(a, sections, results)
    lines = [
        "# Router comparison (SIMULATED)",
        "",
        f"SIMULATED workers (bench/sim: cost model of MiMo-V2-Flash on 8 x H200). Slice: start {a.start:g} s, "
        f"duration {a.duration:g} s of each trace; max output {a.max_output} tokens (decode is not compared); "
        f"prompt scale {a.prompt_scale:g}; prompt seed {a.seed}; KV capacity {a.capacity_tokens:,} tokens per "
        "worker. K = time scale of the run (arrival gaps and sim service times / K, measured times x K). "
        "CPU: ms per request sent and share of one core during the replay.",
    ]
    goals: list[analysis.Goal] = []
    for name, group in sections.items():
        if not name.startswith("main"):
            continue
        summaries = [runs[r.key] for r in group]
        main_q = getattr(a, "queue_policy", "uncached-first")  # ours in the table: the others are beside
        summaries = [s for s in summaries if s.get("router") != "swaserve" or s.get("queue_policy") == main_q]
        for ours in OUR_PRESETS:  # each of our presets in the table against the same round-robin and sglang
            goals += analysis.group_goals(summaries, name[5:], ours)
            goals += accuracy.goals(summaries, name[5:], ours)
    if "queue" in sections and (q := queue_split(results, sections["queue"])):
        results["queue"] = q
        qp = sections["queue"][0]
        lines += ["", f"## Prefill queue policy behind swaserve-seed (rate scale {qp.workload.rate_scale:g}, sim "
                  f"window {qp.fleet.window}; long: above the fcfs run's median, short: at or below it)", "",
                  "| split by | threshold | queue policy | long P90 TTFT ms (n) | short P90 TTFT ms (n) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for sp in q["splits"]:
            uf, fc = (analysis.SplitP90(**sp[k]) for k in ("uncached-first", "fcfs"))
            label = analysis.SPLIT_LABELS[sp["by"]]
            goals += analysis.queue_goals(
                uf, fc, f"swaserve-seed, split by {label} at {sp['threshold']:.0f} tokens"
            )
            for k, v in (("uncached-first", uf), ("fcfs", fc)):
                lines.append(f"| {label} | {v.threshold:,.0f} | {k} | {v.long_p90_ms:,.0f} ({v.long_count}) | "
                             f"{v.short_p90_ms:,.0f} ({v.short_count}) |")  # fmt: skip
        for k, c in q["long_cheap"].items():
            lines.append(
                f"| long input, short uncached (mostly cached) | | {k} | {c['p90_ms']:,.0f} ({c['count']}) | |"
            )
    if "replicas" in sections:
        goals += analysis.replica_goals([runs[r.key] for r in sections["replicas"]], "router replicas")
    results["goals"] = [vars(g) | {"met": g.met, "margin": g.margin} for g in goals]
    lines += ["", "## Goals", "", *(g.line() for g in goals)]
    if results.get("plots"):
        lines += ["", "Plots: " + ", ".join(results["plots"])]
    for name in ("sweep", "hybrid", "replicas"):
        if name in sections:
            title = {
                "sweep": "Rate sweep",
                "hybrid": "Hybrid SWA cache (sim window 128), as the engine is built",
                "replicas": "Router replicas on one Redis (round-robin in front)",
            }[name]
            lines += ["", f"## {title}: {group_header(a, sections[name])}", ""]
            lines.append(_table(runs, sections[name], with_rate=name == "sweep"))
    for name, group in sections.items():
        if name.startswith("main"):
            lines += ["", f"## {group_header(a, group)}", ""]
            lines.append(_table(runs, group))
    return "\n".join(lines)


def _table(runs: dict[str, Any], specs: list[RunSpec], with_rate: bool = False) -> str:
    """The markdown table of `specs`' runs; policies labelled with the queue policy (and rate)."""
    rows = []
    for r in specs:
        queue = r.fleet.queue_policy or ("uncached-first" if r.policy.router == "swaserve" else None)
        label = r.policy.name + (f" ({queue})" if queue else "")
        label += f" x{r.fleet.router_replicas} routers" if r.fleet.router_replicas > 1 else ""
        rows.append(runs[r.key] | {"policy": label + (f" x{r.workload.rate_scale:g}" if with_rate else "")})
    return accuracy.with_columns(analysis.format_table(rows), rows)
