"""Sibling fan-out on a SIMULATED fleet: bursts of requests that share one new prefix, through our router.

    .venv/bin/python bench/fanout.py --quick     # ~1 min: window 0, 8 workers, 8 rounds
    .venv/bin/python bench/fanout.py             # windows 0 and 128, 3 prefix lengths, 2 repeats

One fleet per sim window (bench/compare/fleet.py's recipe: redis-server, sim prefill workers, sim
decode workers, our router), plus more router replicas on the same Redis and one more router that
only carries the background load. Each round sends `--burst` requests at once, each a new random
prefix shared by the whole burst followed by its own suffix (its first token differs from every
other's), either to replica 0 or round-robin over `--replicas` replicas; on a loaded round,
background requests of `--load-tokens` new tokens each (half as many as there are workers) go in
first and the burst leaves once the registry shows their backlog. Between rounds the fleet drains.

Per round: which prefill worker served each request of the burst (the burst routers'
`swaserve_router_prefill_requests_total{worker}`, before and after the round; the background
router is not counted), the most-used worker's share, the burst's hit rate (usage cached tokens /
prompt tokens) against its ideal (every request but the first reuses the whole prefix), and the
router's predicted against reported cached tokens (bench/compare/accuracy.py). The goal (issue 10):
>= 15 of 16 on one worker, unless that worker is saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import orjson  # noqa: E402

from bench.compare import accuracy  # noqa: E402
from bench.compare.fleet import OUR_MODEL, POLICIES, FleetSpec, start_fleet  # noqa: E402
from services.common.registry import WorkerRegistry  # noqa: E402

VOCAB = (100, 150_000)  # token ids drawn from [low, high): inside mimo-tiny's 152,576
GOAL_SHARE = 15 / 16


@dataclass(frozen=True)
class RoundSpec:
    prefix: int  # shared prefix tokens
    replicas: int  # 1: every request to replica 0; else round-robin over this many
    loaded: bool  # background load first
    repeat: int = 0


@dataclass
class RoundResult:
    window: int
    prefix: int
    replicas: int
    loaded: bool
    repeat: int
    sent: int
    ok: int
    per_worker: dict[str, int]  # burst requests served, by prefill worker id
    busy_workers: int  # workers with a backlog when the burst left (background load)
    send_spread_ms: float  # from the burst's first request leaving the client to its last
    prompt_tokens: int
    cached_tokens: int
    ideal_cached_tokens: int
    predicted_tokens: int
    reported_tokens: int
    phantom_hits: int
    errors: list[str]

    @property
    def top(self) -> int:
        return max(self.per_worker.values(), default=0)

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def ideal(self) -> float:
        return self.ideal_cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(frozen=True)
class Setup:
    workers: int = 8
    decode_workers: int = 2
    replicas: int = 4
    burst: int = 16
    suffix: tuple[int, int] = (256, 512)  # suffix tokens, drawn in [low, high]
    load_tokens: int = 65536
    time_scale: float = 1.0
    policy: str = "swaserve-seed"
    seed: int = 1


# -- the fleet ------------------------------------------------------------------------------------
@dataclass
class Routers:
    burst: list[str]  # replica base URLs
    load: str  # the background load's router (same Redis; its requests are not counted)
    redis_url: str


@contextmanager
def fleet(setup: Setup, window: int, logdir: Path) -> Iterator[Routers]:
    """bench/compare/fleet.py's fleet with `replicas` + 1 routers: the last carries the load."""
    policy = POLICIES[setup.policy]
    if policy.router != "swaserve":
        raise ValueError(f"--policy must be one of our router's presets, not {setup.policy}")
    spec = FleetSpec(setup.workers, setup.time_scale, decode_workers=setup.decode_workers, window=window,
                     router_replicas=setup.replicas + 1)  # fmt: skip
    with start_fleet(policy, spec, logdir) as f:
        yield Routers(f.targets[:-1], f.targets[-1], f.redis_url)


# -- one round ------------------------------------------------------------------------------------
def burst_prompts(setup: Setup, prefix: int, rng: np.random.Generator) -> list[list[int]]:
    """`burst` prompts: one new prefix, then suffixes whose first tokens all differ."""
    low, high = VOCAB
    shared = rng.integers(low, high, size=prefix).tolist()
    firsts = rng.choice(np.arange(low, high), size=setup.burst, replace=False).tolist()
    out = []
    for first in firsts:
        n = int(rng.integers(setup.suffix[0], setup.suffix[1] + 1))
        out.append(shared + [first] + rng.integers(low, high, size=n - 1).tolist())
    return out


def _body(prompt: list[int]) -> bytes:
    return orjson.dumps({"model": OUR_MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": True})


async def _complete(http: httpx.AsyncClient, base: str, body: bytes) -> tuple[int, str]:
    """(cached tokens, error) of one non-streaming completion; -1 on failure."""
    try:
        r = await http.post(
            f"{base}/v1/completions", content=body, headers={"Content-Type": "application/json"}
        )
    except httpx.HTTPError as e:
        return -1, f"{type(e).__name__}: {e}"
    if r.status_code != 200:
        return -1, f"HTTP {r.status_code}: {r.text[:200]}"
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]), ""


class SendTimes:
    """When each request to /v1/completions left the client (an httpx request hook)."""

    def __init__(self) -> None:
        self.at: list[float] = []

    async def __call__(self, request: httpx.Request) -> None:
        if request.url.path.endswith("/completions"):
            self.at.append(time.monotonic())


def _backlog(redis_url: str) -> list[int]:
    return [r.queued_tokens for r in WorkerRegistry(redis_url).list(role="prefill", model=OUR_MODEL)]


async def _wait_backlog(redis_url: str, done: bool, want: int = 1, timeout: float = 30.0) -> list[int]:
    """Until the fleet's backlog is empty (done) or holds at least `want` tokens; the last reading."""
    deadline = time.monotonic() + timeout
    while True:
        b = await asyncio.to_thread(_backlog, redis_url)
        reached = sum(b) == 0 if done else sum(b) >= want
        if reached or time.monotonic() > deadline:
            return b
        await asyncio.sleep(0.02)


def _scrape(bases: Sequence[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy counts, requests per worker) summed over the routers."""
    texts = [httpx.get(f"{b}/metrics", timeout=5).text for b in bases]
    workers: dict[str, float] = {}
    for t in texts:
        for w, n in accuracy.per_worker(t).items():
            workers[w] = workers.get(w, 0.0) + n
    return accuracy.combine(accuracy.parse(t) for t in texts), workers


async def run_round(
    setup: Setup, routers: Routers, window: int, spec: RoundSpec, http: httpx.AsyncClient, sent: SendTimes
) -> RoundResult:
    rng = np.random.default_rng(
        [setup.seed, spec.prefix, spec.replicas, int(spec.loaded), spec.repeat, window]
    )
    prompts = burst_prompts(setup, spec.prefix, rng)
    bodies, lengths = [_body(p) for p in prompts], [len(p) for p in prompts]  # encoded before the burst
    targets = routers.burst[: spec.replicas]
    await _wait_backlog(routers.redis_url, done=True)
    # one open connection per request of the burst (the pool keeps them): no connects in the burst
    await asyncio.gather(*(http.get(f"{targets[i % len(targets)]}/health") for i in range(len(bodies))))
    counts0, workers0 = await asyncio.to_thread(_scrape, targets)
    background: list[asyncio.Future[tuple[int, str]]] = []
    busy = 0
    if spec.loaded:
        n = max(1, setup.workers // 2)
        for _ in range(n):
            load = _body(rng.integers(*VOCAB, size=setup.load_tokens).tolist())
            background.append(asyncio.ensure_future(_complete(http, routers.load, load)))
        b = await _wait_backlog(routers.redis_url, done=False, want=n * setup.load_tokens // 2, timeout=5)
        busy = sum(1 for x in b if x > 0)
    sent.at.clear()
    outcomes = await asyncio.gather(
        *(_complete(http, targets[i % len(targets)], b) for i, b in enumerate(bodies))
    )
    spread = max(sent.at) - min(sent.at) if sent.at else 0.0
    bg = await asyncio.gather(*background)
    counts1, workers1 = await asyncio.to_thread(_scrape, targets)
    d = accuracy.minus(counts1, counts0)
    ok = [(c, n) for (c, _), n in zip(outcomes, lengths, strict=True) if c >= 0]
    per_worker = {w: int(n - workers0.get(w, 0.0)) for w, n in workers1.items() if n > workers0.get(w, 0.0)}
    return RoundResult(
        window=window, prefix=spec.prefix, replicas=spec.replicas, loaded=spec.loaded, repeat=spec.repeat,
        sent=len(bodies), ok=len(ok), per_worker=per_worker, busy_workers=busy, send_spread_ms=1000 * spread,
        prompt_tokens=sum(n for _, n in ok), cached_tokens=sum(c for c, _ in ok),
        ideal_cached_tokens=spec.prefix * max(0, len(ok) - 1),
        predicted_tokens=int(d["predicted_tokens"]), reported_tokens=int(d["reported_tokens"]),
        phantom_hits=int(d["phantom_hits"]),
        errors=[e for _, e in outcomes if e] + [f"background: {e}" for _, e in bg if e],
    )  # fmt: skip


def plan_rounds(prefixes: Sequence[int], replicas: int, repeats: int) -> list[RoundSpec]:
    return [
        RoundSpec(p, r, loaded, k)
        for r in sorted({1, replicas})
        for loaded in (False, True)
        for p in prefixes
        for k in range(repeats)
    ]


async def _rounds(
    setup: Setup, routers: Routers, window: int, rounds: Sequence[RoundSpec]
) -> list[RoundResult]:
    sent = SendTimes()
    limits = httpx.Limits(max_connections=2 * setup.burst + setup.workers, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=300, limits=limits, event_hooks={"request": [sent]}) as http:
        return [await run_round(setup, routers, window, r, http, sent) for r in rounds]


def run_window(setup: Setup, window: int, rounds: Sequence[RoundSpec], logdir: Path) -> list[RoundResult]:
    """Every round on one fresh fleet with the sims' `window`."""
    with fleet(setup, window, logdir / f"win{window}") as routers:
        return asyncio.run(_rounds(setup, routers, window, rounds))


# -- the report -----------------------------------------------------------------------------------
HEAD = (
    "| window | replicas | load | prefix | burst ok | sent within ms | on top worker | workers used | hit rate "
    "| ideal | predicted / reported cached | phantom hits |"
)


def table(results: Sequence[RoundResult]) -> str:
    rows = [HEAD, "|" + "---|" * HEAD.count(" | ") + "---|"]
    for r in results:
        load = f"loaded ({r.busy_workers} busy)" if r.loaded else "idle"
        ratio = f"{r.predicted_tokens:,} / {r.reported_tokens:,}"
        rows.append(
            f"| {r.window} | {r.replicas} | {load} | {r.prefix:,} | {r.ok}/{r.sent} | {r.send_spread_ms:.1f} | {r.top} | "
            f"{len(r.per_worker)} | {100 * r.hit_rate:.1f}% | {100 * r.ideal:.1f}% | {ratio} | {r.phantom_hits} |"
        )
    return "\n".join(rows)


def summary(results: Sequence[RoundResult]) -> list[str]:
    lines = []
    for reps in sorted({r.replicas for r in results}):
        rs = [r for r in results if r.replicas == reps]
        met = sum(r.top >= GOAL_SHARE * r.sent for r in rs)
        mean = sum(r.top / r.sent for r in rs) / len(rs)
        lines.append(
            f"- {reps} replica(s): on the top worker {100 * mean:.0f}% of a burst on average; "
            f"{met}/{len(rs)} rounds meet >= 15 of 16"
        )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="window 0, prefixes 4096 and 16384, 1 repeat")
    p.add_argument("--windows", default=None, help="sim windows, one fleet each (0,128; quick 0)")
    p.add_argument(
        "--prefixes", default=None, help="shared prefix lengths (4096,8192,16384; quick 4096,16384)"
    )
    p.add_argument("--repeats", type=int, default=None, help="rounds per configuration (2; quick 1)")
    p.add_argument("--workers", type=int, default=8, help="prefill workers")
    p.add_argument("--replicas", type=int, default=4, help="router replicas of the round-robin rounds")
    p.add_argument("--burst", type=int, default=16, help="requests per burst")
    p.add_argument("--suffix", default="256:512", help="suffix tokens per request, LOW:HIGH")
    p.add_argument("--load-tokens", type=int, default=65536, help="tokens of each background request")
    p.add_argument("--time-scale", type=float, default=1.0, help="the sims' time scale (1: simulated = wall)")
    p.add_argument("--policy", default="swaserve-seed", help="our router's preset (bench/compare/fleet.py)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "out" / "fanout")
    return p


def _ints(spec: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"fanout: {what} must be comma-separated integers, got {spec!r}") from None
    if not values or min(values) < 0:
        raise SystemExit(f"fanout: {what} must be non-negative integers, got {spec!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    windows = _ints(a.windows if a.windows is not None else ("0" if a.quick else "0,128"), "--windows")
    prefixes = _ints(
        a.prefixes if a.prefixes is not None else ("4096,16384" if a.quick else "4096,8192,16384"),
        "--prefixes",
    )
    low, sep, high = a.suffix.partition(":")
    if not (sep and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise SystemExit(f"fanout: --suffix must be LOW:HIGH with 1 <= LOW <= HIGH, got {a.suffix!r}")
    if a.burst < 2 or a.workers < 1 or a.replicas < 1 or min(prefixes) < 1:
        raise SystemExit("fanout: --burst >= 2, --workers >= 1, --replicas >= 1 and prefixes >= 1 needed")
    setup = Setup(a.workers, 2, a.replicas, a.burst, (int(low), int(high)), a.load_tokens, a.time_scale,
                  a.policy, a.seed)  # fmt: skip
    rounds = plan_rounds(prefixes, a.replicas, a.repeats or (1 if a.quick else 2))
    a.out_dir.mkdir(parents=True, exist_ok=True)
    (a.out_dir / ".gitignore").write_text("*\n")  # results and logs stay out of git
    results = [r for w in windows for r in run_window(setup, w, rounds, a.out_dir)]
    body = {"simulated": True, "setup": asdict(setup) | {"argv": sys.argv[1:] if argv is None else argv},
            "rounds": [asdict(r) | {"top": r.top, "hit_rate": r.hit_rate, "ideal": r.ideal} for r in results]}  # fmt: skip
    (a.out_dir / "fanout.json").write_text(json.dumps(body, indent=1))
    errors = [e for r in results for e in r.errors]
    print(
        f"# Sibling fan-out (SIMULATED: bench/sim workers, cost model of MiMo-V2-Flash on 8 x H200, time "
        f"scale {setup.time_scale:g})\n\n{setup.workers} prefill + {setup.decode_workers} decode sim workers, "
        f"our router ({setup.policy}); bursts of {setup.burst} requests sharing one new prefix, suffixes "
        f"{a.suffix} tokens; loaded: {max(1, setup.workers // 2)} background requests of "
        f"{setup.load_tokens:,} tokens first. Goal: >= 15 of 16 on one worker.\n"
    )
    print("\n".join(summary(results)))
    if errors:
        print(f"\n{len(errors)} failed requests, e.g. {errors[0]}")
    print()
    print(table(results))
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
