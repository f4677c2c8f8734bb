"""One fresh fleet per run: simulated workers, the router under test, and (for ours) a fresh Redis.

    with start_fleet(policy, FleetSpec(workers=8, time_scale=2), logdir) as fleet:
        fleet.targets, fleet.model, fleet.prompt_mode     # what the replay sends to
        fleet.router_pids, fleet.fleet_pids               # session leaders, for CPU accounting

Policies:
  swaserve routers  redis-server + `sim --role prefill` (N workers) + `sim --role decode` + our router
                    (`python -m services.router.main ... --prefill-policy P`); prompts as token ids
                    (our router tokenizes text with the model's real tokenizer, not the sims' words).
                    `router_replicas` N > 1: N router processes on the one Redis, each on its own
                    port; the replay sends to them in turn (round-robin by request, as a Service's
                    balancer would spread connections), with no proxy hop in between.
  sglang / vllm     `sim --role both` (N workers, HTTP) + the router with `--worker-urls`; prompts
                    as text, one word per token (the sims' tokenizer), so lengths are exact.

Every process runs in its own session; teardown stops them in reverse order even on errors, and
CPU time is summed over each session (a router that forks children is still counted whole).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import httpx

from bench.sim.launch import sim_workers, stop
from services.common.netutil import free_port
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRegistry

RouterKind = Literal["swaserve", "sglang", "vllm"]
OUR_MODEL = "mimo-tiny"  # our router reads its tokenizer and the SWA window (128) from this model
TEXT_MODEL = "mimo-v2-flash-sim"  # the name role-`both` sims serve to the text routers
MAX_CONTEXT = 262_144  # the sims' default; our router would otherwise take mimo-tiny's 4096
VLLM_ROUTER = Path(sys.executable).with_name("vllm-router")


@dataclass(frozen=True)
class Policy:
    name: str  # as in the table
    router: RouterKind
    arg: str  # our --prefill-policy, or the other router's --policy
    extra: tuple[str, ...] = ()  # more router flags

    @property
    def prompt_mode(self) -> str:
        return "ids" if self.router == "swaserve" else "text"


class _Policies(dict[str, Policy]):
    """The named policies, and variants of ours spelled `NAME[FLAGS]`: NAME's router flags plus FLAGS
    (space-separated), e.g. `swaserve-seed[--no-pending]` or `swaserve-seed[--match-weight 2]`:
    how a sweep names its points without a table entry each."""

    def __missing__(self, key: str) -> Policy:
        base, sep, rest = key.partition("[")
        if not sep or not rest.endswith("]") or base not in self:
            raise KeyError(key)
        p = self[base]
        variant = Policy(key, p.router, p.arg, p.extra + tuple(rest[:-1].split()))
        self[key] = variant
        return variant

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            self[str(key)]
        except KeyError:
            return False
        return True


POLICIES = _Policies(
    {
        p.name: p
        for p in (
            Policy("round-robin", "sglang", "round_robin"),
            Policy("least-load", "swaserve", "load"),
            Policy("swaserve-seed", "swaserve", "seed"),
            Policy("swaserve-cost", "swaserve", "cost"),
            Policy("swaserve-affinity", "swaserve", "affinity"),
            Policy("swaserve-affinity-safe", "swaserve", "affinity", ("--raw-match-credit", "0")),
            Policy("sglang-cache-aware", "sglang", "cache_aware"),
            Policy("vllm-cache-aware", "vllm", "cache_aware"),
        )
    }
)


@dataclass(frozen=True)
class FleetSpec:
    workers: int  # prefill workers (role both: the workers)
    time_scale: float
    queue_policy: str | None = None  # prefill queue order; None: the sim's default for the role
    capacity_tokens: int = 1 << 20  # full-pool KV per worker (the sim's default)
    decode_workers: int = 2  # ours only; each big enough that Reserve never refuses
    decode_capacity_tokens: int = 1 << 26
    heartbeat_ttl: float = 3.0
    window: int = 128  # the sims' cache window (MiMo-V2-Flash: 128); 0: every cached prefix reusable
    chunk_size: int | None = None  # the sims' prefill chunk (--chunk-size); None: theirs, 16384 (LMSYS)
    router_replicas: int = 1  # ours only: router processes sharing the Redis, round-robin in front

    def __post_init__(self) -> None:
        if self.router_replicas < 1:
            raise ValueError(f"router_replicas must be >= 1, got {self.router_replicas}")


@dataclass
class Fleet:
    targets: list[str]  # base URLs of the router (replicas): the replay cycles over them
    model: str
    prompt_mode: str
    router_pids: list[int] = field(default_factory=list)
    fleet_pids: list[int] = field(default_factory=list)  # sims (+ redis)
    sim_logs: list[Path] = field(default_factory=list)
    worker_urls: list[str] = field(default_factory=list)  # role both: each worker's HTTP base
    redis_url: str = ""  # ours: the registry holding the prefill workers' loads

    @property
    def target(self) -> str:
        """The first (or only) router's base URL."""
        return self.targets[0]

    def backlogs(self) -> list[int]:
        """Prompt tokens queued or in prefill on each prefill worker, now (a diagnostic of balance)."""
        if self.redis_url:
            records = WorkerRegistry(self.redis_url).list(role="prefill", model=self.model)
            return [r.queued_tokens for r in records]
        return [int(httpx.get(f"{u}/get_load", timeout=2).json()["queued_tokens"]) for u in self.worker_urls]


def _sim_flags(spec: FleetSpec, model: str) -> list[str]:
    flags = ["--model", model, "--time-scale", f"{spec.time_scale:g}", "--log-level", "WARNING",
             "--max-total-tokens", str(spec.capacity_tokens), "--window", str(spec.window)]  # fmt: skip
    if spec.queue_policy:
        flags += ["--queue-policy", spec.queue_policy]
    if spec.chunk_size:
        flags += ["--chunk-size", str(spec.chunk_size)]
    return flags


def router_argv(
    policy: Policy, port: int, workers: list[str], redis_url: str = "", window: int = 128
) -> list[str]:
    if policy.router == "swaserve":
        return [sys.executable, "-m", "services.router.main", "--host", "127.0.0.1", "--port", str(port),
                "--model", OUR_MODEL, "--redis-url", redis_url, "--kv-transport", "grpc",
                "--max-context", str(MAX_CONTEXT), "--prefill-policy", policy.arg,
                "--kv-window", str(window), "--log-level", "warning", *policy.extra]  # fmt: skip
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", policy.arg,
              "--prometheus-port", str(free_port()), *policy.extra]  # fmt: skip
    if policy.router == "sglang":
        return [sys.executable, "-m", "sglang_router.launch_router", *common, "--log-level", "warn"]
    return [str(VLLM_ROUTER), *common, "--log-level", "warning"]


@contextmanager
def _process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop(proc)


def _wait(ready: object, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 90) -> None:
    """Poll `ready()` until true; fail with the log's tail if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if ready():  # type: ignore[operator]
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready in {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _ours_ready(base: str, spec: FleetSpec) -> bool:
    h = httpx.get(f"{base}/health", timeout=2).json()
    if h.get("prefill_workers") != spec.workers or h.get("decode_workers") != spec.decode_workers:
        return False
    metrics = httpx.get(f"{base}/metrics", timeout=2).text
    return "swaserve_router_index_usable 1" in metrics


def _text_router_ready(base: str) -> bool:  # ready once it routes a request (2 tokens, off the page grid)
    body = {"model": TEXT_MODEL, "prompt": "t1 t2", "max_tokens": 1}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=5).status_code == 200


@contextmanager
def start_fleet(policy: Policy, spec: FleetSpec, logdir: Path) -> Iterator[Fleet]:
    """A fresh fleet for one run; everything stopped on exit, errors included."""
    logdir.mkdir(parents=True, exist_ok=True)
    if spec.router_replicas > 1 and policy.router != "swaserve":
        raise ValueError(f"router replicas: only our router shares its state (not {policy.router})")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        if policy.router == "swaserve":
            redis = stack.enter_context(RedisServer(log_path=logdir / "redis.log"))
            assert redis.proc is not None
            common = [*_sim_flags(spec, OUR_MODEL), "--redis-url", redis.url,
                      "--heartbeat-ttl", f"{spec.heartbeat_ttl:g}"]  # fmt: skip
            prefill = stack.enter_context(
                sim_workers("prefill", spec.workers, *common, log=logdir / "sim-prefill.log")
            )
            decode_flags = [*common, "--max-total-tokens", str(spec.decode_capacity_tokens)]
            decode = stack.enter_context(
                sim_workers("decode", spec.decode_workers, *decode_flags, log=logdir / "sim-decode.log")
            )
            bases, routers = [], []
            for i in range(spec.router_replicas):  # all started, then each waited for
                p = port if i == 0 else free_port()
                log = logdir / ("router.log" if i == 0 else f"router-{i}.log")
                argv = router_argv(policy, p, [], redis.url, spec.window)
                routers.append((stack.enter_context(_process(argv, log)), log))
                bases.append(f"http://127.0.0.1:{p}")
            for (router, log), b in zip(routers, bases, strict=True):
                _wait(lambda b=b: _ours_ready(b, spec), router, log, f"our router at {b}")
            fleet = Fleet(bases, OUR_MODEL, policy.prompt_mode, [r.pid for r, _ in routers],
                          [prefill.proc.pid, decode.proc.pid, redis.proc.pid],
                          [prefill.log, decode.log], redis_url=redis.url)  # fmt: skip
        else:
            sims = stack.enter_context(
                sim_workers("both", spec.workers, *_sim_flags(spec, TEXT_MODEL), log=logdir / "sim-both.log")
            )
            argv = router_argv(policy, port, sims.workers)
            router = stack.enter_context(_process(argv, logdir / f"{policy.router}-router.log"))
            _wait(lambda: _text_router_ready(base), router, logdir / f"{policy.router}-router.log",
                  f"{policy.router}-router")  # fmt: skip
            fleet = Fleet([base], TEXT_MODEL, policy.prompt_mode, [router.pid], [sims.proc.pid],
                          [sims.log], worker_urls=sims.workers)  # fmt: skip
        yield fleet


# -- CPU accounting -------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores, /proc/stat: user..steal, not idle or iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq + steal) / _TICK


def session_cpu_seconds(leaders: list[int]) -> float:
    """utime + stime of every live process in the sessions led by `leaders` (from /proc)."""
    want, total = set(leaders), 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        # after "pid (comm)": state ppid pgrp session ... utime(12) stime(13)
        if int(fields[3]) in want:
            total += int(fields[11]) + int(fields[12])
    return total / _TICK
