"""The replay's round-robin over several base URLs (router replicas with no balancer in front), against
two real HTTP servers that stream OpenAI-style completions."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.replay.main import main as replay_main


class _Completions(BaseHTTPRequestHandler):
    seen: list[int]  # per server: the prompt lengths it was sent, in order

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(len(body["prompt"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 1}
        for chunk in ({"choices": [{"text": "x"}]}, {"choices": [], "usage": usage}):
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[list[tuple[str, list[int]]]]:
    out, running = [], []
    for _ in range(3):
        seen: list[int] = []
        handler = type("H", (_Completions,), {"seen": seen})
        srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        running.append(srv)
        out.append((f"http://127.0.0.1:{srv.server_address[1]}", seen))
    yield out
    for srv in running:
        srv.shutdown()
        srv.server_close()


def test_requests_go_to_the_bases_in_turn(servers: list[tuple[str, list[int]]], tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    lengths = [10, 20, 30, 40, 50, 60, 70]  # distinct, so each server's share is identifiable
    trace.write_text(
        "".join(
            json.dumps({"timestamp": 10 * i, "input_length": n, "output_length": 1, "hash_ids": [i]}) + "\n"
            for i, n in enumerate(lengths)
        )
    )
    out = tmp_path / "r.json"
    targets = ",".join(url + "/" for url, _ in servers)  # a trailing slash is dropped
    argv = ["--trace", str(trace), "--target", targets, "--model", "m", "--seed", "1"]
    assert replay_main([*argv, "--json", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    assert (data["completed"], data["failed"]) == (7, 0)
    assert [seen for _, seen in servers] == [[10, 40, 70], [20, 50], [30, 60]]
    assert data["setup"]["replicas"] == [url for url, _ in servers[1:]]


def test_an_empty_target_list_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text(
        json.dumps({"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}) + "\n"
    )
    assert replay_main(["--trace", str(trace), "--target", " , "]) == 2
    assert "--target: no base URL" in capsys.readouterr().err
