"""Router comparison on SIMULATED fleets: one run, one table of routing policies per trace and fleet size.

    .venv/bin/python bench/compare_routers.py --quick          # ~2 min: conversation, 8 workers, 3 policies
    .venv/bin/python bench/compare_routers.py                  # full: both traces, 8 and 32 workers, ...

Each run starts a fresh fleet (fresh Redis, fresh simulated workers: cold caches), replays a slice
of a Mooncake trace through the router under test with bench.replay (open loop, same prompts for
every policy: fixed --seed), reads the router's and the fleet's CPU from /proc around the replay,
and stops everything. Policies (bench/compare/fleet.py): round-robin and cache_aware of
sglang-router and cache_aware of vllm-router in front of sim role `both`; our router with
--prefill-policy load | seed | cost in front of sim prefill + decode workers.

Queue order: every fleet's prefill queue runs fcfs in the tables (--queue-policy), so that routing
alone is compared; swaserve-seed with our workers' own uncached-first order is run beside in each
table. --router-replicas N adds runs of our policies with N router processes on one Redis (the
replay sends to them in turn). --agentic adds a generated agentic trace (bench/replay/agentic.py:
~85k-token prompts of growing tool sessions), the one the router-CPU goal is judged on. Any
Mooncake-format trace can be passed with --trace; nothing in the harness depends on which.

Scaling (stated in every report): --max-output 8 (decode is not what is compared), prompts at
their real lengths (--prompt-scale 1), --rate-scale X (default 8: at X = 1 the conversation
trace asks ~41k prefill tok/s of 8 workers of ~100k tok/s each, 5% load; X = 8 with its 3-second
bursts queues visibly), and a time scale K per run chosen so that the fleet sees about
--wall-rate requests per wall second (CPU of a 2-core machine), at most --max-time-scale (every
wall-clock overhead of router and sims is multiplied by K in the report, so K stays small).
See docs/bench-compare.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from bench.compare.fleet import POLICIES, FleetSpec  # noqa: E402
from bench.compare.plots import sweep_plots  # noqa: E402
from bench.compare.report import group_header, report  # noqa: E402
from bench.compare.run import RunSpec, Workload, execute  # noqa: E402
from bench.replay.agentic import AgenticSpec, generate  # noqa: E402
from bench.replay.plan import Scaling, TraceSlice, plan  # noqa: E402
from bench.replay.prompts import BLOCK_MODES  # noqa: E402
from bench.replay.traces import load_trace  # noqa: E402

TRACES = ("mooncake_fast25/conversation_trace.jsonl", "mooncake_fast25/synthetic_trace.jsonl")
FULL_POLICIES = ("round-robin", "least-load", "swaserve-seed", "swaserve-cost", "sglang-cache-aware",
                 "vllm-cache-aware")  # the table; --policies adds swaserve-affinity(-safe)  # fmt: skip
VLLM_RENDER_WORKERS = 4  # vllm-router renders each prompt on every worker: wall rate x 4 / workers


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="conversation, 8 workers, 90 s slice, 3 policies")
    p.add_argument("--traces-dir", type=Path, default=ROOT.parent / "shared" / "traces")
    p.add_argument(
        "--trace", action="append", type=Path, help="trace file(s) instead of the two Mooncake ones"
    )
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--start", type=float, default=0.0, help="slice start, trace seconds")
    p.add_argument("--duration", type=float, default=None, help="slice length, trace seconds (400; quick 90)")
    p.add_argument("--workers", default=None, help="prefill worker counts (8,32; quick 8)")
    p.add_argument("--policies", default=None, help=f"main table policies ({','.join(POLICIES)})")
    p.add_argument("--rate-scale", type=float, default=8.0, help="the main table's rate scale X")
    p.add_argument("--sweep", default=None, help="rate scales of the sweep (2,4,8,16; quick 4,8; '' none)")
    p.add_argument("--sweep-policies", default=None, help="default: the main policies but vllm-cache-aware")
    p.add_argument("--window", type=int, default=0, help="sim cache window of the main runs (0: see docs)")
    p.add_argument(
        "--hybrid-policies", default=None, help="window-128 runs, conversation, 8 workers ('' none)"
    )
    p.add_argument(
        "--queue-policy",
        choices=("fcfs", "uncached-first"),
        default="fcfs",
        help="our prefill sims' queue order in the tables (the text routers' sims run fcfs); swaserve-seed "
        "with the other order is run beside in each table",
    )
    p.add_argument(
        "--no-queue-policy", action="store_true", help="skip the other-order runs and the queue split"
    )
    p.add_argument(
        "--router-replicas",
        type=int,
        default=1,
        help="N > 1: also run our main policies with N router replicas on one Redis (first trace and "
        "worker count), beside the one-replica runs",
    )
    p.add_argument(
        "--agentic",
        action="store_true",
        help="add a generated agentic trace (bench/replay/agentic.py, seed --seed, written to --out-dir)",
    )
    p.add_argument(
        "--chunk-size", type=int, default=None, help="the sims' prefill chunk, tokens (default theirs: 16384)"
    )
    p.add_argument(
        "--time-scale", type=float, default=None, help="fix K for every run (default: from --wall-rate)"
    )
    p.add_argument("--wall-rate", type=float, default=32.0, help="requests per wall second the fleet sees")
    p.add_argument("--max-time-scale", type=float, default=4.0)
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.3,
        help="cores of other work on the machine above which a run is redone",
    )
    p.add_argument("--retries", type=int, default=1, help="passes redoing failed or disturbed runs")
    p.add_argument("--capacity-tokens", type=int, default=1 << 20, help="KV tokens per simulated worker")
    p.add_argument("--max-output", type=int, default=8)
    p.add_argument("--prompt-scale", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=1, help="prompt seed, the same for every run")
    p.add_argument(
        "--prompt-blocks",
        choices=BLOCK_MODES,
        default="continue",
        help="bench.replay's prompt builder: continue (a next turn starts with the previous prompt) or "
        "blocks (tokens from hash ids only, the builder before issue 5's rerun)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="no runs: report from --out-dir's compare.json (same flags)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep --out-dir's runs; redo only missing, failed or disturbed ones",
    )
    return p


def _names(spec: str | None, default: list[str]) -> list[str]:
    if spec is None:
        return default
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; known: {', '.join(POLICIES)}")
    return names


def resolve(a: argparse.Namespace) -> argparse.Namespace:
    """Fill the defaults that depend on --quick."""
    quick = a.quick
    if a.router_replicas < 1:
        raise SystemExit(f"--router-replicas must be >= 1, got {a.router_replicas}")
    traces = a.trace or [a.traces_dir / t for t in (TRACES[:1] if quick else TRACES)]
    if a.agentic:
        traces = [*traces, a.out_dir / "agentic_trace.jsonl"]
    names = [_name(t) for t in traces]
    if len(set(names)) < len(names):  # run keys and section names carry the trace's name
        raise SystemExit(f"two traces with one name in {names}: rename one")
    main = _names(
        a.policies, ["round-robin", "swaserve-seed", "sglang-cache-aware"] if quick else list(FULL_POLICIES)
    )
    return replace_ns(
        a,
        traces=traces,
        duration=a.duration or (90.0 if quick else 400.0),
        workers=[int(w) for w in (a.workers or ("8" if quick else "8,32")).split(",")],
        policies=main,
        sweep=[float(x) for x in (a.sweep if a.sweep is not None else ("4,8" if quick else "2,4,8,16")).split(",") if x],
        sweep_policies=_names(a.sweep_policies, [p for p in main if p != "vllm-cache-aware"]),
        hybrid_policies=_names(
            a.hybrid_policies,
            [] if quick else ["round-robin", "least-load", "swaserve-seed", "sglang-cache-aware"],
        ),
    )  # fmt: skip


def replace_ns(a: argparse.Namespace, **kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**(vars(a) | kw))


# -- planning -----------------------------------------------------------------------------------
def offered_rate(trace: Path, start: float, duration: float) -> float:
    """Requests per trace second in the slice (before the rate scale)."""
    planned = plan(load_trace(trace), TraceSlice(start, duration), Scaling())
    span = planned[-1].send_at_s if len(planned) > 1 else duration
    return len(planned) / max(span, 1e-9)


def time_scale(a: argparse.Namespace, policy: str, workers: int, rate: float) -> float:
    if a.time_scale:
        return float(a.time_scale)
    wall = a.wall_rate * (min(1.0, VLLM_RENDER_WORKERS / workers) if policy == "vllm-cache-aware" else 1.0)
    k = min(a.max_time_scale, wall / rate)
    return float(f"{k:.2g}")


def our_queue(a: argparse.Namespace, other: bool = False) -> str | None:
    """Our sims' --queue-policy for the tables (or, `other`, for the runs beside): fcfs, or None for the
    sims' own default (uncached-first; such runs keep the run keys they had before fcfs was the default)."""
    fcfs = (a.queue_policy == "fcfs") != other
    return "fcfs" if fcfs else None


def make_run(
    a: argparse.Namespace, trace: Path, policy: str, workers: int, x: float, **fleet: Any
) -> RunSpec:
    if POLICIES[policy].router == "swaserve":
        fleet.setdefault("queue_policy", our_queue(a))
    rate = a.base_rates[trace] * x
    k = time_scale(a, policy, workers, rate)
    w = Workload(trace, a.start, a.duration, x, k, a.max_output, a.prompt_scale, a.seed,
                 prompt_blocks=a.prompt_blocks)  # fmt: skip
    spec = FleetSpec(workers, k, capacity_tokens=a.capacity_tokens, window=a.window, chunk_size=a.chunk_size)
    return RunSpec(POLICIES[policy], w, replace(spec, **fleet))


def _name(trace: Path) -> str:
    return trace.stem.removesuffix("_trace")


def plan_sections(a: argparse.Namespace) -> dict[str, list[RunSpec]]:
    first, w0 = a.traces[0], a.workers[0]
    sections: dict[str, list[RunSpec]] = {
        f"main {_name(t)} {w} workers": [make_run(a, t, p, w, a.rate_scale) for p in a.policies]
        for t in a.traces
        for w in a.workers
    }
    if not a.no_queue_policy:  # swaserve-seed with the other queue order, beside in every table
        for t in a.traces:
            for w in a.workers:
                beside = make_run(
                    a, t, "swaserve-seed", w, a.rate_scale, queue_policy=our_queue(a, other=True)
                )
                sections[f"main {_name(t)} {w} workers"].append(beside)
        sections["queue"] = [
            make_run(a, first, "swaserve-seed", w0, a.rate_scale, queue_policy=q) for q in (None, "fcfs")
        ]  # fmt: skip: (uncached-first, fcfs)
    if a.router_replicas > 1:
        ours = [p for p in a.policies if POLICIES[p].router == "swaserve"]
        sections["replicas"] = [
            make_run(a, first, p, w0, a.rate_scale, router_replicas=n)
            for p in ours
            for n in (1, a.router_replicas)
        ]
    if a.sweep:
        sections["sweep"] = [make_run(a, first, p, w0, x) for x in a.sweep for p in a.sweep_policies]
    if a.hybrid_policies:
        sections["hybrid"] = [make_run(a, first, p, w0, a.rate_scale, window=128) for p in a.hybrid_policies]
    return sections


# -- running ------------------------------------------------------------------------------------
def _one(run: RunSpec, out: Path, attempt: int) -> dict[str, Any]:
    try:
        return execute(run, out, attempt)
    except Exception as e:  # one failed run must not lose the others; teardown already happened
        return {"key": run.key, "policy": run.policy.name, "workers": run.fleet.workers,
                "error": f"{type(e).__name__}: {e}", "workload": {"time_scale": run.workload.time_scale}}  # fmt: skip


def _busy(s: dict[str, Any], limit: float) -> bool:
    return bool(s.get("error")) or (s.get("other_cpu_cores") or 0.0) > limit


def _stale(s: dict[str, Any], run: RunSpec) -> bool:
    """A kept run made with other prompts (runs before --prompt-blocks used the ids-only builder)."""
    return s.get("workload", {}).get("prompt_blocks", "blocks") != run.workload.prompt_blocks


def _better(new: dict[str, Any], old: dict[str, Any] | None) -> bool:
    """Keep the new attempt of a run rather than the old one: it ran, and with less other work."""
    if old is None or old.get("error"):
        return True
    return not new.get("error") and new["other_cpu_cores"] < old["other_cpu_cores"]


def run_all(
    a: argparse.Namespace, sections: dict[str, list[RunSpec]], out: Path, results: dict[str, Any]
) -> dict[str, Any]:
    """Every run once; then, up to --retries passes, again each run that failed or shared the machine
    with more than --max-other-cpu cores of other work, keeping the attempt with the least of it."""
    unique = {r.key: r for runs in sections.values() for r in runs}
    runs = results["runs"]
    todo = [
        k for k in unique if k not in runs or _busy(runs[k], a.max_other_cpu) or _stale(runs[k], unique[k])
    ]
    for _ in range(1 + a.retries):
        for i, key in enumerate(todo, 1):
            t0, run, old = time.monotonic(), unique[key], results["runs"].get(key)
            s = _one(run, out, len((old or {}).get("attempts", [])))
            tries = (old or {}).get("attempts", []) + [
                {k: s.get(k) for k in ("other_cpu_cores", "p90_ttft_ms", "hit_rate", "error")}
            ]
            if _better(s, old):
                results["runs"][key] = s
            results["runs"][key]["attempts"] = tries
            (out / "compare.json").write_text(json.dumps(results, indent=1, default=str))
            brief = s.get("error") or (
                f"hit {100 * (s['hit_rate'] or 0):.1f}% (ideal {100 * s['ideal_hit_rate']:.1f}%), P90 TTFT "
                f"{s['p90_ttft_ms']:.0f} ms, failed {s['failed']}, router {s['router_core_util']:.0%} fleet "
                f"{s['fleet_core_util']:.0%} client {s['client_core_util']:.0%} of a core, other work "
                f"{s['other_cpu_cores']:.2f} cores"
            )
            print(f"[{'retry ' * bool(old)}{i}/{len(todo)}] {key} K={run.workload.time_scale:g}: {brief} "
                  f"({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        todo = [k for k in todo if _busy(results["runs"][k], a.max_other_cpu)]
    return results


def _interrupt(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # once: a second signal must not cut the teardown short
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    a = resolve(build_parser().parse_args(argv))
    a.argv = sys.argv[1:] if argv is None else list(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped with kill: tear the fleet down
    try:
        return _main(a)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(a: argparse.Namespace) -> int:
    if a.agentic and not a.report_only:
        records = generate(AgenticSpec(seed=a.seed))
        a.traces[-1].parent.mkdir(parents=True, exist_ok=True)
        a.traces[-1].write_text("".join(r.json() + "\n" for r in records))
    try:
        a.base_rates = {t: offered_rate(t, a.start, a.duration) for t in a.traces}
        empty = [str(t) for t, rate in a.base_rates.items() if rate <= 0]
        if empty:
            raise ValueError(f"no request in the slice of {', '.join(empty)}")
    except (OSError, ValueError) as e:
        print(f"compare_routers: {e} (--traces-dir / --trace, --start / --duration)", file=sys.stderr)
        return 2
    out: Path = a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / ".gitignore").write_text("*\n")  # results stay out of git
    sections = plan_sections(a)
    setup = {k: v for k, v in vars(a).items() if k != "base_rates"}
    results: dict[str, Any] = {"simulated": True, "setup": setup, "runs": {}, "sections": {}}
    if a.report_only or a.resume:
        results["runs"] = json.loads((out / "compare.json").read_text())["runs"]
    results["sections"] = {n: [r.key for r in runs] for n, runs in sections.items()}
    if not a.report_only:
        run_all(a, sections, out, results)
    if "sweep" in sections:
        sweep = [results["runs"][r.key] for r in sections["sweep"]]
        results["plots"] = [str(p) for p in sweep_plots(sweep, out, group_header(a, sections["sweep"]))]
    text = report(a, sections, results)
    (out / "compare.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "compare.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
