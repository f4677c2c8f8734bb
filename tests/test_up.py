"""`swaserve up`: the supervisor's restart and no-orphan rules, and the whole cluster end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from services.common.netutil import free_port, port_open
from swaserve.cli import build_parser
from swaserve.up import _PDEATHSIG_SHIM, Child, Supervisor, build_children
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_decode_ttls_reach_the_decode_workers_only(tmp_path):
    def argvs(*flags: str) -> dict[str, list[str]]:
        args = build_parser().parse_args(["up", "--prefill", "1", "--decode", "2", *flags])
        return {c.name: c.argv for c in build_children(args, "redis://127.0.0.1:1", tmp_path)}

    default = argvs()
    assert not any("--reserve-ttl" in a or "--pending-ttl" in a for a in default.values())
    set_ = argvs("--decode-reserve-ttl", "7", "--decode-pending-ttl", "9.5")
    for name in ("decode-0", "decode-1"):
        a = set_[name]
        assert a[a.index("--reserve-ttl") + 1] == "7.0" and a[a.index("--pending-ttl") + 1] == "9.5"
    assert "--reserve-ttl" not in set_["prefill-0"] and "--pending-ttl" not in set_["router"]
    extra = argvs(
        "--prefill-args", "--host-kv-tokens 4096 --chunk-size 64", "--decode-args", "--max-running 3"
    )
    assert extra["prefill-0"][-4:] == ["--host-kv-tokens", "4096", "--chunk-size", "64"]
    assert extra["decode-1"][-2:] == ["--max-running", "3"] and "--host-kv-tokens" not in extra["decode-0"]


def test_a_crashing_child_is_restarted_with_a_doubling_backoff(tmp_path):
    child = Child(
        "flaky", [sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "flaky.log", lambda: False
    )
    sup = Supervisor([child], redis=None)
    sup.start_all()
    starts = []
    deadline = time.monotonic() + 4.5
    while time.monotonic() < deadline and len(starts) < 2:
        before = child.proc
        sup.tick()
        if child.proc is not before:
            starts.append(time.monotonic())
        time.sleep(0.05)
    sup.stop_all()
    assert child.crashes >= 2 and len(starts) >= 2
    assert starts[1] - starts[0] >= 1.9  # 1 s, then 2 s
    assert child.log_path.read_text().count("---- swaserve up: starting flaky") == len(starts) + 1


def test_children_die_with_a_killed_supervisor():
    # a stand-in supervisor that starts one child through the exec shim, then is SIGKILLed
    parent_code = (
        "import os, subprocess, sys, time\n"
        f"shim = {_PDEATHSIG_SHIM!r}\n"
        "p = subprocess.Popen([sys.executable, '-c', shim, str(os.getpid()), sys.executable, '-c',"
        " 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    assert wait_for(lambda: "sleep" in Path(f"/proc/{child_pid}/cmdline").read_text(), timeout=5)
    parent.kill()
    parent.wait()
    assert wait_for(lambda: not alive(child_pid), timeout=5)


@pytest.mark.skipif(
    importlib.util.find_spec("services.router.discovery") is None,
    reason="the router's Redis discovery (services/router/discovery.py) is not there yet",
)
def test_up_serves_restarts_and_stops_cleanly(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swaserve", "up", "--model", "mimo-tiny", "--port", str(port),
         "--run-dir", str(tmp_path), "--startup-timeout", "120"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()

    def seen(pattern: str) -> bool:
        return any(re.search(pattern, line) for line in lines)

    try:
        assert wait_for(lambda: seen("swaserve is up") or proc.poll() is not None, timeout=150), "".join(
            lines
        )
        assert seen("swaserve is up"), "".join(lines)
        assert seen(r"curl http://127\.0\.0\.1:\d+/v1/chat/completions") and seen("from openai import OpenAI")
        pids = {
            m.group(1): int(m.group(2))
            for line in lines
            if (m := re.search(r"started (\S+) \(pid (\d+)", line))
        }
        assert set(pids) == {"prefill-0", "decode-0", "router"}

        body = {"model": "mimo-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        assert answer["usage"]["completion_tokens"] == 5

        os.kill(pids["decode-0"], signal.SIGKILL)  # a crash: restarted, and healthy again
        assert wait_for(lambda: seen(r"restarted decode-0 \(pid"), timeout=20), "".join(lines)
        assert wait_for(lambda: sum("decode-0 ready" in line for line in lines) >= 2, timeout=60), "".join(
            lines
        )
        new_decode = int(re.search(r"restarted decode-0 \(pid (\d+)", "".join(lines)).group(1))  # type: ignore[union-attr]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert seen("stopped")
        for pid in [*pids.values(), new_decode]:
            assert wait_for(lambda pid=pid: not alive(pid), timeout=5), f"orphan {pid}"
        assert not port_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
