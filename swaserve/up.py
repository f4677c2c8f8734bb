"""`swaserve up`: the whole cluster on this machine, supervised.

    redis-server (own, free port; unless --redis-url)
    N GCache nodes (--gcache N, default 0)  python -m services.gcache.main   (L3; disk in the run dir)
    N prefill workers, N decode workers     python -m services.{prefill,decode}.main
    the router                              python -m services.router.main  (OpenAI API on --port)
    Prometheus (--prometheus)               Debian's binary on loopback, scraping every /metrics

Every child runs in its own session (so a Ctrl-C at the terminal reaches only this supervisor,
which then stops the children in order: router, workers, Redis) and gets SIGTERM if the
supervisor dies without cleaning up (PR_SET_PDEATHSIG, set by a tiny exec shim): no orphans.
A child that exits unexpectedly is restarted on the same ports after a backoff that doubles
(1 s .. 30 s) and resets once the child has stayed up for a minute. Children's output goes to
log files in the run directory; a crash prints the tail of its log.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common.netutil import free_port, port_open
from services.common.redis_server import RedisNotInstalled, RedisServer
from services.models.home import swaserve_home
from services.models.model_store import resolve_model
from swaserve.up_security import add_security_args, exposure_warning, router_security_args, security_env

# exec shim: die with the supervisor (PR_SET_PDEATHSIG survives execve), then become the real child
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1 = PR_SET_PDEATHSIG
    "os.getppid() == int(sys.argv[1]) or sys.exit(1)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)
BACKOFF_MIN, BACKOFF_MAX, STABLE_AFTER = 1.0, 30.0, 60.0
DEFAULT_L3_HOST_TOKENS = 65536  # L2 a prefill worker gets with --gcache unless --prefill-args sets one


def say(msg: str) -> None:
    print(f"swaserve up: {msg}", flush=True)


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    healthy: Callable[[], bool]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_MIN
    restart_at: float | None = None
    crashes: int = 0
    ready: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        env = os.environ | {"PYTHONUNBUFFERED": "1"} | self.extra_env
        with open(self.log_path, "ab") as log:
            log.write(
                f"---- swaserve up: starting {self.name} at {time.strftime('%H:%M:%S')} ----\n".encode()
            )
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *self.argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        self.started_at = time.monotonic()
        self.restart_at = None
        self.ready = False

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # its whole process group (start_new_session)
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])


def http_ready(port: int) -> Callable[[], bool]:
    """A worker's readiness probe (GET /ready on its metrics port: engine loaded, registered)."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1.0) as r:
                return r.status == 200
        except (OSError, ValueError):  # 503 (an HTTPError), refused, timed out
            return False

    return check


def router_healthy(port: int, prefill: int, decode: int) -> Callable[[], bool]:
    """The router's readiness probe (GET /ready: 200 once a prefill and a decode worker are
    routable), and every worker this launcher started routable."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1.0) as r:
                body = json.loads(r.read())
        except (OSError, ValueError):  # 503 until ready
            return False
        return bool(
            body.get("status") == "ready"
            and body.get("prefill_workers", 0) >= prefill
            and body.get("decode_workers", 0) >= decode
        )

    return check


class Supervisor:
    def __init__(self, children: list[Child], redis: RedisServer | None) -> None:
        self.children = children
        self.redis = redis
        self.stopping = False

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def start_all(self) -> None:
        for c in self.children:
            c.start()
            assert c.proc is not None
            say(f"started {c.name} (pid {c.proc.pid}, log {c.log_path})")

    def tick(self) -> None:
        """Restart what died (after its backoff); mark what became healthy."""
        now = time.monotonic()
        if self.redis is not None and not self.redis.running():
            say("redis-server died; restarting it on the same port")
            self.redis.start()
        for c in self.children:
            code = c.exited()
            if code is not None and c.restart_at is None:
                c.crashes += 1
                if now - c.started_at > STABLE_AFTER:
                    c.backoff = BACKOFF_MIN
                say(
                    f"{c.name} exited with code {code}; restarting in {c.backoff:.0f}s. Last lines of its log:"
                )
                print(c.log_tail(), flush=True)
                c.restart_at = now + c.backoff
                c.backoff = min(BACKOFF_MAX, c.backoff * 2)
                c.ready = False
            elif c.restart_at is not None and now >= c.restart_at:
                c.start()
                assert c.proc is not None
                say(f"restarted {c.name} (pid {c.proc.pid})")
            elif code is None and not c.ready and c.healthy():
                c.ready = True
                say(f"{c.name} ready ({now - c.started_at:.1f}s)")

    def wait_ready(self, timeout: float, max_crashes: int = 3) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stopping:
            self.tick()
            if all(c.ready for c in self.children):
                return True
            crashed = [c for c in self.children if c.crashes >= max_crashes]
            if crashed:
                say(f"{crashed[0].name} crashed {crashed[0].crashes} times while starting; giving up")
                return False
            if time.monotonic() > deadline:
                waiting = ", ".join(c.name for c in self.children if not c.ready)
                say(f"not ready after {timeout:.0f}s: {waiting}")
                return False
            time.sleep(0.25)
        return False

    def supervise(self) -> None:
        while not self.stopping:
            self.tick()
            time.sleep(0.5)

    def stop_all(self, timeout: float = 10.0) -> None:
        # the router first (no new requests), then the workers, then GCache nodes, Redis last
        for group in (
            [c for c in self.children if c.name == "router"],
            [c for c in self.children if c.name != "router" and not c.name.startswith("gcache")],
            [c for c in self.children if c.name.startswith("gcache")],
        ):
            for c in group:
                c.signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for c in group:
                if c.proc is None:
                    continue
                try:
                    c.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    say(f"{c.name} did not stop within {timeout:.0f}s; killing it")
                    c.signal(signal.SIGKILL)
                    c.proc.wait()
        if self.redis is not None:
            self.redis.stop()


def port_healthy(port: int) -> Callable[[], bool]:
    return lambda: port_open("127.0.0.1", port)


def gcache_children(args: argparse.Namespace, redis_url: str, run_dir: Path) -> list[Child]:
    """--gcache N nodes: memory --gcache-memory each, a disk tier of --gcache-disk in the run dir."""
    children = []
    for i in range(args.gcache):
        port, mport = free_port(), free_port()
        argv = [
            sys.executable, "-m", "services.gcache.main", "--host", "127.0.0.1", "--port", str(port),
            "--advertise-host", "127.0.0.1", "--redis-url", redis_url, "--metrics-port", str(mport),
            "--memory-bytes", args.gcache_memory, "--node-id", f"gcache-{i}",
        ]  # fmt: skip
        if args.gcache_disk not in ("", "0"):
            argv += ["--disk-dir", str(run_dir / f"gcache-{i}"), "--disk-bytes", args.gcache_disk]
        children.append(Child(f"gcache-{i}", argv, run_dir / f"gcache-{i}.log", port_healthy(port)))
    return children


def l3_prefill_args(args: argparse.Namespace, redis_url: str) -> list[str]:
    """With GCache nodes, prefill workers use them as L3 (through an L2 of --host-kv-tokens)."""
    if not args.gcache:
        return []
    extra = ["--gcache-redis-url", redis_url]
    if "--host-kv-tokens" not in args.prefill_args:
        extra += ["--host-kv-tokens", str(DEFAULT_L3_HOST_TOKENS)]
    return extra


def build_children(args: argparse.Namespace, redis_url: str, run_dir: Path) -> list[Child]:
    workers = args.prefill + args.decode
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    children: list[Child] = gcache_children(args, redis_url, run_dir)
    for role, count in (("prefill", args.prefill), ("decode", args.decode)):
        for i in range(count):
            port, mport = free_port(), free_port()
            argv = [
                sys.executable, "-m", f"services.{role}.main", "--model", args.model, "--host", "127.0.0.1",
                "--port", str(port), "--advertise-host", "127.0.0.1", "--redis-url", redis_url,
                "--metrics-port", str(mport), "--torch-threads", str(threads),
            ]  # fmt: skip
            if role == "prefill":
                argv += ["--kv-transport", args.kv_transport, *l3_prefill_args(args, redis_url)]
            argv += shlex.split(args.prefill_args if role == "prefill" else args.decode_args)
            if role == "decode" and args.decode_reserve_ttl is not None:
                argv += ["--reserve-ttl", str(args.decode_reserve_ttl)]
            if role == "decode" and args.decode_pending_ttl is not None:
                argv += ["--pending-ttl", str(args.decode_pending_ttl)]
            name = f"{role}-{i}"
            children.append(Child(name, argv, run_dir / f"{name}.log", http_ready(mport)))
    router_argv = [
        sys.executable, "-m", "services.router.main", "--host", args.host, "--port", str(args.port),
        "--model", args.model, "--redis-url", redis_url, "--kv-transport", args.kv_transport,
        *router_security_args(args),
    ]  # fmt: skip
    children.append(
        Child(
            "router",
            router_argv,
            run_dir / "router.log",
            router_healthy(args.port, args.prefill, args.decode),
        )
    )
    env = security_env(args)  # the internal token / TLS: the same for every service
    for c in children:
        c.extra_env |= env
    return children


def scrape_targets(args: argparse.Namespace, children: list[Child]) -> list[Any]:
    """Every child's /metrics: workers and GCache nodes on their --metrics-port, the router on its
    HTTP port; job = the service, label worker = the child's name."""
    from swaserve.observability.prom import ScrapeTarget

    out = []
    for c in children:
        if c.name == "router":
            port = args.port
        elif "--metrics-port" in c.argv:
            port = int(c.argv[c.argv.index("--metrics-port") + 1])
        else:
            continue
        out.append(ScrapeTarget(c.name.rsplit("-", 1)[0], f"127.0.0.1:{port}", {"worker": c.name}))
    return out


def start_prometheus(args: argparse.Namespace, children: list[Child], run_dir: Path) -> Any:
    from swaserve.observability.prom import PrometheusNotInstalled, PrometheusServer

    shim = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid())]
    prom = PrometheusServer(
        scrape_targets(args, children), run_dir, interval=args.prometheus_interval,
        port=args.prometheus_port, wrapper=shim,
    )  # fmt: skip
    try:
        prom.start()
    except PrometheusNotInstalled as e:
        raise ValueError(str(e)) from None
    say(
        f"prometheus on {prom.url} (scrapes every {args.prometheus_interval}; log {run_dir / 'prometheus.log'})"
    )
    return prom


def banner(args: argparse.Namespace, redis_url: str, run_dir: Path) -> str:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    base = f"http://{host}:{args.port}/v1"
    q = "What is the capital of France?"
    gcache = f", {args.gcache} GCache" if args.gcache else ""
    prom = (
        f"prometheus: http://127.0.0.1:{args.prometheus_port}  (dashboards as PNG: swaserve dashboards render "
        f"--prometheus http://127.0.0.1:{args.prometheus_port} --out DIR)\n"
        if args.prometheus
        else ""
    )
    body = json.dumps({"model": args.model, "messages": [{"role": "user", "content": q}], "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $SWASERVE_API_KEY"' if args.api_keys else ""
    api_key = 'os.environ["SWASERVE_API_KEY"]' if args.api_keys else '"none"'
    return f"""
swaserve is up: {base}  (model {args.model}; {args.prefill} prefill, {args.decode} decode{gcache}; redis {redis_url})
logs: {run_dir}
{prom}
  curl {base}/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{body}'

  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key={api_key})
  r = client.chat.completions.create(
      model="{args.model}", messages=[{{"role": "user", "content": "{q}"}}], max_tokens=32)
  print(r.choices[0].message.content)

Ctrl-C stops everything.
"""


def run_up(args: argparse.Namespace) -> int:
    if args.prefill < 1 or args.decode < 1:
        raise ValueError("--prefill and --decode need at least 1 worker each")
    if args.gcache < 0:
        raise ValueError("--gcache must be >= 0")
    if port_open("127.0.0.1", args.port):
        raise ValueError(f"port {args.port} is already in use; pick another with --port")
    warning = exposure_warning(args)
    if warning:
        say(warning)
    say(f"model {args.model}: {resolve_model(args.model)}")  # build it once, here, before the workers race
    run_dir = (
        Path(args.run_dir) if args.run_dir else swaserve_home() / "run" / time.strftime("up-%Y%m%d-%H%M%S")
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    redis = None
    redis_url = args.redis_url
    if not redis_url:
        shim = [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid())]
        try:
            redis = RedisServer(log_path=run_dir / "redis.log", wrapper=shim).start()
        except RedisNotInstalled as e:
            raise ValueError(str(e)) from None
        redis_url = redis.url
        say(f"redis-server on {redis_url}")
    sup = Supervisor(build_children(args, redis_url, run_dir), redis)
    signal.signal(signal.SIGINT, sup.on_signal)
    signal.signal(signal.SIGTERM, sup.on_signal)
    prom = None
    try:
        sup.start_all()
        if args.prometheus:
            prom = start_prometheus(args, sup.children, run_dir)
            args.prometheus_port = prom.port
        if not sup.wait_ready(args.startup_timeout):
            return 0 if sup.stopping else 1
        print(banner(args, redis_url, run_dir), flush=True)
        sup.supervise()
        return 0
    finally:
        say("stopping")
        sup.stop_all()
        if prom is not None:
            prom.stop()
        say("stopped")


def add_up_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("up", help="start redis, prefill and decode workers and the router on this machine")
    u.add_argument("--port", type=int, default=8000, help="the router's HTTP port (OpenAI API)")
    u.add_argument(
        "--host", default="127.0.0.1",
        help="the router's bind address (every other service binds 127.0.0.1; 0.0.0.0 exposes the router)",
    )  # fmt: skip
    add_security_args(u)
    u.add_argument(
        "--model", default="smollm2", help="a known model name (smollm2, mimo-tiny) or a directory"
    )
    u.add_argument("--prefill", type=int, default=1, help="prefill workers")
    u.add_argument("--decode", type=int, default=1, help="decode workers")
    u.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    u.add_argument("--kv-transport", default="grpc", choices=["grpc", "shm", "torch"])
    u.add_argument(
        "--prefill-args", default="",
        help='extra flags for every prefill worker, e.g. --prefill-args="--host-kv-tokens 65536"',
    )  # fmt: skip
    u.add_argument("--decode-args", default="", help="extra flags for every decode worker")
    u.add_argument(
        "--gcache", type=int, default=0,
        help="GCache nodes to start (L3 for the prefill workers, which then get an L2 of "
        f"{DEFAULT_L3_HOST_TOKENS} tokens unless --prefill-args sets --host-kv-tokens)",
    )  # fmt: skip
    u.add_argument("--gcache-memory", default="1G", help="memory tier of each GCache node (K/M/G)")
    u.add_argument(
        "--gcache-disk", default="4G", help="disk tier of each GCache node, in the run dir (0: none)"
    )
    u.add_argument(
        "--decode-reserve-ttl", type=float, default=None,
        help="seconds a decode reservation waits for its KV (the decode worker's default: 30)",
    )  # fmt: skip
    u.add_argument(
        "--decode-pending-ttl", type=float, default=None,
        help="seconds KV that landed on a decode worker waits for its Decode (default: 60)",
    )  # fmt: skip
    u.add_argument(
        "--startup-timeout", type=float, default=600.0, help="seconds to wait for all to be healthy"
    )
    u.add_argument("--run-dir", default="", help="where logs go (default: $SWASERVE_HOME/run/up-<time>)")
    u.add_argument(
        "--prometheus", action="store_true",
        help="also start Prometheus (Debian's package) on 127.0.0.1 scraping every service, with "
        "swaserve's recording rules and alerts; its URL is printed (docs/observability.md)",
    )  # fmt: skip
    u.add_argument("--prometheus-port", type=int, default=0, help="Prometheus's port (default: a free one)")
    u.add_argument(
        "--prometheus-interval", default="1s", help="scrape and rule interval (Prometheus duration)"
    )
    u.set_defaults(func=run_up)
