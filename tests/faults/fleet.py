"""A real `swaserve up` fleet for the fault suite: start it, find its processes, kill one, read /proc.

`swaserve up --model mimo-tiny --prefill 2 --decode 2 --gcache 1` runs on loopback with its own
redis-server; every child is its own process group (so a kill -9 of the group is a container's
death). The supervisor restarts a killed child on its ports after 1 s and a killed Redis at once.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from services.common.netutil import free_port

MODEL = "mimo-tiny"
HEARTBEAT_TTL = 6.0  # the workers' --heartbeat-ttl default (services/worker/flags.py)
GCACHE_MEMORY_MIB = 64  # each GCache node's memory tier (it fills up under load: RSS grows by up to this)


@dataclass(frozen=True)
class ProcStats:
    rss_kib: int  # resident + swapped out (the machine may swap under the fleet's ~8 GB)
    fds: int


def proc_stats(pid: int) -> ProcStats | None:
    """RSS and open file descriptors of a live process, from /proc (None once it is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kib = [re.search(rf"^{k}:\s+(\d+) kB", status, re.M) for k in ("VmRSS", "VmSwap")]
    return ProcStats(sum(int(m.group(1)) for m in kib if m), fds)


def _children_of(ppid: int) -> dict[int, str]:
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            out[int(entry)] = cmd
    return out


@dataclass
class Fleet:
    base: str  # the router's URL
    up: subprocess.Popen[bytes]
    run_dir: Path
    prefill: int
    decode: int
    extra: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)  # started here, not by up

    @property
    def redis_url(self) -> str:
        m = re.search(r"redis-server on (redis://\S+)", self.up_log.read_text())
        assert m, self.diag()
        return m.group(1)

    def start_router_replica(self, name: str = "router-b") -> int:
        """A second router over the fleet's Redis (`swaserve up` starts one); returns its port once
        it is healthy with every worker."""
        port = free_port()
        argv = [sys.executable, "-m", "services.router.main", "--host", "127.0.0.1", "--port", str(port),
                "--model", MODEL, "--redis-url", self.redis_url]  # fmt: skip
        with (self.run_dir / f"{name}.log").open("w") as out:
            self.extra[name] = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.wait_healthy(120, f"http://127.0.0.1:{port}")
        return port

    @property
    def up_log(self) -> Path:
        return self.run_dir / "up.out"

    def pids(self) -> dict[str, int]:
        """Every supervised child's current pid by name (prefill-0, decode-1, gcache-0, router, redis)."""
        found: dict[str, int] = {}
        for m in re.finditer(r"(?:started|restarted) (\S+) \(pid (\d+)", self.up_log.read_text()):
            found[m.group(1)] = int(m.group(2))
        found |= {name: p.pid for name, p in self.extra.items() if p.poll() is None}
        for pid, cmd in _children_of(self.up.pid).items():
            if os.path.basename(cmd.split(" ", 1)[0]) == "redis-server":
                found["redis"] = pid
        return found

    def stats(self, exclude: str = "") -> dict[str, ProcStats]:
        out = {}
        for name, pid in self.pids().items():
            s = proc_stats(pid)
            if name != exclude and s is not None:
                out[name] = s
        return out

    def kill(self, name: str) -> int:
        """kill -9 a child (its whole process group where it leads one); returns the pid killed."""
        pid = self.pids()[name]
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
        return pid

    def metric(self, name: str, base: str = "") -> float:
        text = httpx.get(f"{base or self.base}/metrics", timeout=10).text
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def healthy(self, base: str = "") -> bool:
        try:
            h = httpx.get(f"{base or self.base}/health", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return bool(
            h.get("status") == "ok"
            and h.get("prefill_workers") == self.prefill
            and h.get("decode_workers") == self.decode
        )

    def wait_healthy(self, timeout: float = 120.0, base: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy(base):
            if self.up.poll() is not None:
                raise AssertionError(f"swaserve up exited {self.up.returncode}\n{self.diag()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"fleet not healthy within {timeout:.0f}s\n{self.diag()}")
            time.sleep(0.25)

    def diag(self, chars: int = 2500) -> str:
        parts = []
        for p in [self.up_log, *sorted(self.run_dir.glob("*.log"))]:
            try:
                parts.append(f"---- {p.name}\n{p.read_text(errors='replace')[-chars:]}")
            except OSError:
                pass
        return "\n".join(parts)


@contextmanager
def swaserve_fleet(run_dir: Path, prefill: int = 2, decode: int = 2, gcache: int = 1) -> Iterator[Fleet]:
    """`swaserve up` with the tiny model, healthy; stopped (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    argv = [
        sys.executable, "-m", "swaserve", "up", "--model", MODEL, "--port", str(port),
        "--prefill", str(prefill), "--decode", str(decode), "--gcache", str(gcache),
        "--gcache-memory", f"{GCACHE_MEMORY_MIB}M", "--gcache-disk", "0", "--run-dir", str(run_dir),
    ]  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "up.out").open("w") as out:
        up = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    fleet = Fleet(f"http://127.0.0.1:{port}", up, run_dir, prefill, decode)
    try:
        fleet.wait_healthy(300)
        yield fleet
    finally:
        for p in fleet.extra.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            try:
                up.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
