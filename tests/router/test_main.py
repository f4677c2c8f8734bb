"""`python -m services.router.main` serves the API from the command line, and imports no torch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from services.router.main import parse_args
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel

ROOT = Path(__file__).resolve().parents[2]


def test_router_imports_no_torch() -> None:
    code = (
        "import sys, services.router.main, services.router.app; "
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers'))]; "
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "1", "--model", "m"],  # no workers
        ["--port", "1", "--model", "m", "--prefill", "a:1"],  # prefill without decode
        ["--port", "1", "--model", "m", "--decode", "a:1", "--redis-url", "redis://x"],
        ["--port", "1", "--model", "m", "--redis-url", "redis://x", "--prefill", "a:1"],
    ],
)
def test_bad_command_lines(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_comma_separated_and_repeated_addresses() -> None:
    from services.router.main import worker_pool

    args = parse_args(
        ["--port", "1", "--model", "m", "--prefill", "a:1,b:2", "--decode", "c:3", "--decode", "d:4"]
    )
    pool = worker_pool(args, "m")
    assert [w.addr for w in pool.prefill_workers()] == ["a:1", "b:2"]
    assert [w.addr for w in pool.decode_workers()] == ["c:3", "d:4"]


def test_serves_from_the_command_line(toy: ToyModel) -> None:
    prefill, decode = FakePrefillWorker(toy).start(), FakeDecodeWorker(toy).start()
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "services.router.main",
        "--port",
        str(port),
        "--model",
        "smollm2",
        "--prefill",
        prefill.addr,
        "--decode",
        decode.addr,
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_up(base, proc)
        with httpx.Client(base_url=base, timeout=10) as h:
            assert [m["id"] for m in h.get("/v1/models").json()["data"]] == ["smollm2"]
            r = h.post(
                "/v1/completions", json={"model": "SmolLM2-135M-Instruct", "prompt": "x", "max_tokens": 3}
            )
            assert r.status_code == 200, r.text
            assert r.json()["model"] == "smollm2" and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        prefill.stop()
        decode.stop()


def _wait_up(base: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else "router exited"
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError("router did not come up")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
