"""A sim-worker process: N workers on consecutive ports, labelled simulated, CPU per request at exit;
the HTTP API's answers checked directly; the gRPC prefill reply; and no torch in the process."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import grpc
import httpx
import pytest

from bench.sim.launch import sim_workers
from services.common.prompt_wire import pack_ids
from services.proto_gen import worker_pb2, worker_pb2_grpc


def consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no consecutive free ports")


def test_count_hosts_independent_workers_and_reports_cpu_per_request() -> None:
    base = consecutive_free_ports(3)
    with sim_workers("both", 3, "--http-port", str(base), "--time-scale", "50") as fleet:
        assert fleet.workers == [f"http://127.0.0.1:{base + i}" for i in range(3)]
        ids = set()
        for i, url in enumerate(fleet.workers):
            info = httpx.get(f"{url}/server_info", timeout=5).json()
            assert info["simulated"] is True and info["time_scale"] == 50
            ids.add(info["worker_id"])
            prompt = " ".join(f"t{j}" for j in range(40 + i))
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 3}, timeout=10)
            assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 40 + i
            # independent engines: each worker saw only its own prompt
            assert httpx.get(f"{url}/get_load", timeout=5).json()["free_kv_tokens"] == 1 << 20
        assert len(ids) == 3
        assert "SIMULATED both worker(s)" in fleet.log.read_text()
    assert "3 requests" in fleet.summary and "ms CPU per request" in fleet.summary


@pytest.fixture(scope="module")
def http_worker() -> Iterator[str]:
    with sim_workers(
        "both", 1, "--model", "simmodel", "--time-scale", "50", "--max-context", "2048"
    ) as fleet:
        yield fleet.workers[0]


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": "t1", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": [1, -5]}, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "t1 " * 2040, "max_tokens": 20}, None),
        ("/generate", {"sampling_params": {}}, "text"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
    ],
)
def test_bad_requests_get_the_openai_error_object(
    http_worker: str, path: str, body: dict, param: str | None
) -> None:
    r = httpx.post(f"{http_worker}{path}", json=body, timeout=5)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_token_endpoints_use_the_word_tokenizer(http_worker: str) -> None:
    tok = httpx.post(f"{http_worker}/tokenize", json={"prompt": "t7 t8 hello"}, timeout=5).json()
    assert tok["tokens"][:2] == [7, 8] and tok["count"] == 3 and tok["max_model_len"] == 2048
    rendered = httpx.post(f"{http_worker}/v1/completions/render", json={"prompt": "t3 t4"}, timeout=5).json()
    assert rendered[0]["token_ids"] == [3, 4]
    assert (
        httpx.post(f"{http_worker}/detokenize", json={"tokens": [5, 6]}, timeout=5).json()["prompt"]
        == "t5 t6"
    )
    models = httpx.get(f"{http_worker}/v1/models", timeout=5).json()
    assert [m["id"] for m in models["data"]] == ["simmodel"]
    assert httpx.get(f"{http_worker}/model_info", timeout=5).json()["simulated"] is True
    assert httpx.get(f"{http_worker}/no/such/path", timeout=5).status_code == 404


def test_generate_streams_cumulative_text_as_sglang_does(http_worker: str) -> None:
    body = {"text": "t1 t2 t3", "sampling_params": {"max_new_tokens": 6}, "stream": True}
    with httpx.stream("POST", f"{http_worker}/generate", json=body, timeout=10) as r:
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json

    last = json.loads(events[-2])
    assert len(last["output_ids"]) == 6 and last["text"].split() == [f"t{i}" for i in last["output_ids"]]
    assert last["meta_info"]["finish_reason"] == {"type": "length", "length": 6}
    first = json.loads(events[0])
    assert first["output_ids"] == last["output_ids"][:1] and first["meta_info"]["finish_reason"] is None


def test_chat_completion_counts_the_message_words(http_worker: str) -> None:
    body = {"model": "simmodel", "messages": [{"role": "user", "content": "t1 t2 t3 t4"}], "max_tokens": 4}
    r = httpx.post(f"{http_worker}/v1/chat/completions", json=body, timeout=10).json()
    assert r["usage"]["prompt_tokens"] == 4 and r["usage"]["completion_tokens"] == 4
    assert len(r["choices"][0]["message"]["content"].split()) == 4


def test_grpc_prefill_ships_unless_one_token_ends_the_request() -> None:
    with sim_workers("prefill", 1, "--time-scale", "50") as fleet:
        with grpc.insecure_channel(fleet.workers[0]) as ch:
            stub = worker_pb2_grpc.PrefillWorkerStub(ch)

            def prefill(rid: str, n: int, max_tokens: int) -> worker_pb2.PrefillReply:
                req = worker_pb2.PrefillRequest(
                    rid=rid, prompt_ids_packed=pack_ids(range(1, n + 1)), decode_addr="127.0.0.1:1",
                    sampling=worker_pb2.SamplingParams(max_tokens=max_tokens),
                )  # fmt: skip
                return stub.Prefill(req, timeout=10)

            r = prefill("a", 1000, 16)
            assert not r.finish_reason and r.cached_tokens == 0
            r = prefill("b", 1000, 1)
            assert r.finish_reason == "length" and r.cached_tokens == 992
            with pytest.raises(grpc.RpcError) as e:
                prefill("c", 10, 0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            health = stub.Health(worker_pb2.HealthRequest(), timeout=5)
            assert health.role == "prefill" and health.ready and health.free_kv_tokens == 1 << 20


TORCH_PROBE = textwrap.dedent(
    """
    import sys, traceback
    importers = []

    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" and not importers:
                importers.extend(f.filename for f in traceback.extract_stack())
            return None

    sys.meta_path.insert(0, Probe())
    import bench.sim.main, bench.sim.worker  # noqa: E401
    print("\\n".join(f for f in importers if "/services/" in f or "/bench/" in f))
    """
)


def _torch_importers() -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", TORCH_PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.split()


def test_simulated_workers_import_no_torch() -> None:
    assert _torch_importers() == []
