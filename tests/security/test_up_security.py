"""`swaserve up` with API keys and the internal token: what each process listens on (read from
/proc, not from the argv), keys checked on the router, the token required on every gRPC port."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import openai
import pytest

from services.common.netutil import free_port
from services.gcache.wire import method as gcache_method
from services.proto_gen import worker_pb2
from swaserve.cli import build_parser
from swaserve.up import build_children
from tests.security.conftest import ROOT, add_key
from tests.waiting import wait_for


def children(tmp_path: Path, *flags: str) -> dict[str, object]:
    args = build_parser().parse_args(["up", "--prefill", "1", "--decode", "1", "--gcache", "1", *flags])
    return {c.name: c for c in build_children(args, "redis://127.0.0.1:1", tmp_path)}


def test_flags_reach_the_router_and_every_service(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    add_key("--file", str(keys), name="a")
    (tmp_path / "token").write_text("t0k3n")
    kids = children(tmp_path, "--api-keys", str(keys), "--internal-token-file", str(tmp_path / "token"))
    for name, c in kids.items():
        assert c.extra_env["SWASERVE_INTERNAL_TOKEN_FILE"] == str(tmp_path / "token")  # type: ignore[attr-defined]
        argv = c.argv  # type: ignore[attr-defined]
        assert ("--api-keys" in argv) == (name == "router")
        if name != "router":
            assert argv[argv.index("--host") + 1] == "127.0.0.1"
    plain = children(tmp_path)
    assert all(not c.extra_env for c in plain.values()) and "--api-keys" not in plain["router"].argv  # type: ignore[attr-defined]


def test_bad_files_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file; make a key: swaserve keys add"):
        children(tmp_path, "--api-keys", str(tmp_path / "missing.json"))
    (tmp_path / "empty.json").write_text('{"version": 1, "keys": []}')
    with pytest.raises(ValueError, match="no active key"):
        children(tmp_path, "--api-keys", str(tmp_path / "empty.json"))
    with pytest.raises(ValueError, match="SWASERVE_INTERNAL_TOKEN_FILE=.*No such file"):
        children(tmp_path, "--internal-token-file", str(tmp_path / "nope"))


def _listening(pids: set[int]) -> list[tuple[str, int, int]]:
    """(address, port, pid) of every TCP socket in LISTEN held by one of `pids`."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    owner[target[8:-1]] = pid
        except OSError:
            continue
    out = []
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or f[9] not in owner:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))  # each 32-bit word little-endian
            ip = ipaddress.ip_address(raw)
            mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 (a dual-stack socket's v4 address)
            out.append((str(mapped or ip), int(hexport, 16), owner[f[9]]))
    return out


def _tree(root: int) -> set[int]:
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parent[int(d)] = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return tree


def _grpc_refuses(port: int) -> bool:
    """A call without the token to a worker's or a GCache node's method: UNAUTHENTICATED?"""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        for m, req in (("/swaserve.worker.PrefillWorker/Health", worker_pb2.HealthRequest()),
                       ("/swaserve.worker.DecodeWorker/Health", worker_pb2.HealthRequest()),
                       (gcache_method("Stats"), None)):  # fmt: skip
            try:
                ch.unary_unary(m)(req.SerializeToString() if req else b"", timeout=3)
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return True
    return False


def test_up_exposes_only_the_router_which_checks_keys(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys.json")
    key = add_key("--file", keys, name="me")
    (tmp_path / "token").write_text("internal-" + "5" * 32)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "swaserve", "up", "--model", "mimo-tiny", "--port", str(port), "--host", "0.0.0.0",
         "--gcache", "1", "--api-keys", keys, "--internal-token-file", str(tmp_path / "token"),
         "--run-dir", str(tmp_path / "run"), "--startup-timeout", "150"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True).start()
    try:
        assert wait_for(lambda: any("swaserve is up" in x for x in lines) or proc.poll() is not None, 180)
        text = "".join(lines)
        assert "swaserve is up" in text, text
        assert "Authorization: Bearer $SWASERVE_API_KEY" in text
        listening = _listening(_tree(proc.pid))
        router = [(a, p) for a, p, _ in listening if p == port]
        others = [(a, p) for a, p, _ in listening if p != port]
        assert router == [("0.0.0.0", port)], listening
        assert len(others) >= 7, listening  # redis, 2 workers x (gRPC, probes), GCache gRPC + metrics
        exposed = [
            (a, p, _cmdline(pid))
            for a, p, pid in listening
            if p != port and not ipaddress.ip_address(a).is_loopback
        ]
        assert not exposed, exposed

        base = f"http://127.0.0.1:{port}/v1"
        answer = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60).chat.completions.create(
            model="mimo-tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=3
        )  # through workers that require the internal token
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base, api_key="sk-swa-guess", max_retries=0).models.list()
        refusing = [p for _, p in others if _grpc_refuses(p)]
        assert len(refusing) == 3, (refusing, listening)  # prefill, decode, GCache
        if socket.gethostname():  # the router answers on a non-loopback address too, where one exists
            ext = [a for a in _host_addresses() if not ipaddress.ip_address(a).is_loopback]
            for a in ext[:1]:
                with pytest.raises(openai.AuthenticationError):
                    openai.OpenAI(base_url=f"http://{a}:{port}/v1", api_key="x", max_retries=0).models.list()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")[:200]
    except OSError:
        return "?"


def _host_addresses() -> list[str]:
    try:
        out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, timeout=5).stdout
    except OSError:
        return []
    return [a for a in out.split() if re.fullmatch(r"[\d.]+", a)]
