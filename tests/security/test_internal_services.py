"""The internal token and TLS on real services: a GCache node process (its client, NodeConn, in
this process), and a router process (`python -m services.router.main --api-keys FILE`) in front
of FAKE gRPC workers (tests/router/fake_workers.py) served by make_server with a token."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from services.common import grpc_auth
from services.common.grpc_auth import InternalSecurity, internal_channel
from services.common.grpc_server import make_server
from services.common.netutil import free_port
from services.gcache.conn import NodeConn, NodeError
from services.gcache.wire import method
from services.proto_gen import gcache_pb2, worker_pb2_grpc
from tests.router.fake_workers import (
    _LANDED,
    _LANDED_LOCK,
    FakeDecodeWorker,
    FakePrefillWorker,
    ToyModel,
    _Server,
)
from tests.security.conftest import ROOT, Certs, add_key

TOKEN = "tok-" + "7" * 40


@pytest.fixture
def as_service(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """This process's channels configured from the environment the test sets (then reset)."""
    grpc_auth.process_security.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    grpc_auth.process_security.cache_clear()


class Proc:
    """A service process; its output collected by a thread; ready once `marker` is printed."""

    def __init__(self, argv: list[str], env: dict[str, str], marker: str, timeout: float = 60) -> None:
        self.proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if marker in line:
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{argv[2]} did not start:\n" + "".join(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def gcache_node(env: dict[str, str]) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "services.gcache.main", "--host", "127.0.0.1", "--advertise-host", "127.0.0.1",
            "--port", str(port), "--memory-bytes", str(16 << 20), "--data-port", "-1"]  # fmt: skip
    return Proc(argv, env, "GCACHE_READY"), f"127.0.0.1:{port}"


def stats_code(addr: str, sec: InternalSecurity) -> grpc.StatusCode:
    with internal_channel(addr, security=sec) as ch:
        call = ch.unary_unary(method("Stats"), response_deserializer=gcache_pb2.StatsReply.FromString)
        try:
            call(b"", timeout=10)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()


def test_gcache_node_with_token_and_mtls(
    tmp_path: Path, certs: Certs, as_service: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text(TOKEN)
    env = {"SWASERVE_INTERNAL_TOKEN_FILE": str(tmp_path / "token"), "SWASERVE_TLS_CA": str(certs.ca),
           "SWASERVE_TLS_CERT": str(certs.server_cert), "SWASERVE_TLS_KEY": str(certs.server_key)}  # fmt: skip
    node, addr = gcache_node(env)
    try:
        for k, v in env.items():  # this process: a prefill worker of the same cluster
            as_service.setenv(k, v)
        conn = NodeConn(addr, timeout=10)
        try:
            key, value = os.urandom(16), os.urandom(50_000)
            assert [o.ok for o in conn.put([(key, value)]).statuses] == [True]  # a client stream passes
            got = conn.get([key])  # the get stream (server streaming) passes
            assert bytes(got.values[0]) == value
        finally:
            conn.close()
        pem = {
            "cert": certs.client_cert.read_bytes(),
            "key": certs.client_key.read_bytes(),
            "ca": certs.ca.read_bytes(),
        }
        assert stats_code(addr, InternalSecurity(token=TOKEN, **pem)) == grpc.StatusCode.OK  # type: ignore[arg-type]
        assert stats_code(addr, InternalSecurity(**pem)) == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[arg-type]
        assert stats_code(addr, InternalSecurity(token=TOKEN)) == grpc.StatusCode.UNAVAILABLE  # plaintext
        as_service.delenv("SWASERVE_INTERNAL_TOKEN_FILE")
        grpc_auth.process_security.cache_clear()
        conn = NodeConn(addr, timeout=10)
        try:
            with pytest.raises(NodeError) as e:
                conn.get([os.urandom(16)])
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
        finally:
            conn.close()
    finally:
        node.stop()


def serve_fake(fake: FakePrefillWorker | FakeDecodeWorker, sec: InternalSecurity) -> None:
    """The fake on a server from make_server (what real workers use), with `sec`."""
    server, port = make_server("127.0.0.1", 0, max_workers=8, security=sec)
    if isinstance(fake, FakeDecodeWorker):
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(fake, server)
    else:
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(fake, server)
    server.start()
    fake._srv = _Server(server, port)
    if isinstance(fake, FakeDecodeWorker):
        with _LANDED_LOCK:
            _LANDED[fake.addr] = {}


def test_router_process_sends_the_token_and_checks_keys(
    tmp_path: Path, model_dir: Path, toy: ToyModel
) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    keys = str(tmp_path / "keys.json")
    key = add_key("--file", keys, name="client")
    fakes = []
    for worker_token in (TOKEN, "another-token"):
        prefill, decode = FakePrefillWorker(toy), FakeDecodeWorker(toy)
        serve_fake(prefill, InternalSecurity(token=worker_token))
        serve_fake(decode, InternalSecurity(token=worker_token))
        fakes.append((prefill, decode))
    routers = []
    try:
        for prefill, decode in fakes:
            port = free_port()
            argv = [sys.executable, "-m", "services.router.main", "--port", str(port), "--model", str(model_dir),
                    "--served-model-name", "m", "--prefill", prefill.addr, "--decode", decode.addr,
                    "--api-keys", keys]  # fmt: skip
            routers.append(
                (
                    Proc(argv, {"SWASERVE_INTERNAL_TOKEN_FILE": str(tmp_path / "token")}, "Uvicorn running"),
                    port,
                )
            )
        (_, good_port), (_, bad_port) = routers
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{good_port}/v1", api_key=key, max_retries=0, timeout=30
        )
        reply = client.completions.create(model="m", prompt="hi", max_tokens=5, temperature=0)
        assert reply.choices[0].text and len(fakes[0][0].requests) == 1  # the token reached the workers
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(
                base_url=f"http://127.0.0.1:{good_port}/v1", api_key="sk-swa-nope", max_retries=0
            ).models.list()
        other = openai.OpenAI(
            base_url=f"http://127.0.0.1:{bad_port}/v1", api_key=key, max_retries=0, timeout=30
        )
        with pytest.raises(openai.APIStatusError) as e:  # workers that want another token refuse the router
            other.completions.create(model="m", prompt="hi", max_tokens=5)
        assert e.value.status_code >= 500 and fakes[1][0].requests == [] and fakes[1][1].reserved == {}
    finally:
        for proc, _ in routers:
            proc.stop()
        for prefill, decode in fakes:
            prefill.stop()
            decode.stop()
