"""Simulated gRPC prefill and decode workers behind swaserve's own router, unchanged: redis-server,
2 sim prefill workers and 1 sim decode worker (two sim-worker processes), the router process as
`swaserve up` starts it, and the official openai client. A repeated prompt comes back with cached
tokens, which only the prefill worker that computed it first can report."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from bench.sim.launch import SimFleet, sim_workers, stop
from services.common.kv_event_wire import KVKeys
from services.common.netutil import free_port
from services.common.redis_server import RedisNotInstalled, RedisServer
from services.common.registry import WorkerRegistry

MODEL = "mimo-tiny"  # the router reads its tokenizer and window (128) from the model directory
PAGE = 16


@dataclass
class Cluster:
    base: str
    redis_url: str
    prefill: SimFleet
    decode: SimFleet


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from services.models.model_store import resolve_model

    resolve_model(MODEL)  # the router waits for this directory; build it if this machine lacks it
    logs = tmp_path_factory.mktemp("sim-pd")
    try:
        server = RedisServer(log_path=logs / "redis.log").start()
    except RedisNotInstalled as e:
        pytest.skip(str(e))
    common = ("--model", MODEL, "--redis-url", server.url, "--time-scale", "10", "--heartbeat-ttl", "3")
    port = free_port()
    router_argv = [sys.executable, "-m", "services.router.main", "--host", "127.0.0.1", "--port", str(port),
                   "--model", MODEL, "--redis-url", server.url, "--kv-transport", "grpc"]  # fmt: skip
    try:
        with (
            sim_workers("prefill", 2, *common, log=logs / "prefill.log") as prefill,
            sim_workers("decode", 1, *common, log=logs / "decode.log") as decode,
            (logs / "router.log").open("wb") as out,
        ):
            router = subprocess.Popen(
                router_argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            base = f"http://127.0.0.1:{port}"
            try:
                _wait_healthy(base, router, logs / "router.log")
                yield Cluster(base, server.url, prefill, decode)
            finally:
                stop(router)
    finally:
        server.stop()


def _wait_healthy(base: str, router: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert router.poll() is None, log.read_text()[-3000:]
        try:
            h = httpx.get(f"{base}/health", timeout=2).json()
            if h.get("prefill_workers") == 2 and h.get("decode_workers") == 1:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"router not healthy:\n{log.read_text()[-3000:]}")


def _client(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)


def test_workers_register_as_real_ones_with_a_simulated_label(cluster: Cluster) -> None:
    records = WorkerRegistry(cluster.redis_url).list(model=MODEL)
    assert sorted(r.role for r in records) == ["decode", "prefill", "prefill"]
    assert all(r.labels.get("simulated") == "1" for r in records)
    assert {r.worker_id for r in records if r.role == "prefill"} == set(cluster.prefill.ready["worker_ids"])
    assert all(r.capacity_tokens == 1 << 20 for r in records)
    assert all(float(r.labels["prefill_tokens_per_s"]) > 0 for r in records if r.role == "prefill")


def test_a_repeated_prompt_is_cached_on_the_worker_that_computed_it(cluster: Cluster) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(100, 100_000) for _ in range(600)]
    client = _client(cluster.base)
    cached = []
    for _ in range(3):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
        assert r.usage is not None and r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 600
        assert r.usage.prompt_tokens_details is not None
        cached.append(r.usage.prompt_tokens_details.cached_tokens)
        time.sleep(0.3)  # the KV events reach the router's index
    assert cached[0] == 0
    assert cached[1] == cached[2] == (600 - 1) // PAGE * PAGE  # window-safe, page-aligned, one token left
    # only one prefill worker holds the prompt's blocks: the repeats went where the first one was computed
    db = redis.Redis.from_url(cluster.redis_url)
    sizes = [int(db.scard(KVKeys().of("l1", w)[0])) for w in cluster.prefill.ready["worker_ids"]]
    assert sorted(sizes) == [0, 600 // PAGE]
    metrics = httpx.get(f"{cluster.base}/metrics", timeout=5).text
    hits = re.search(r'^swaserve_router_decisions_total\{reason="cache_hit"\} ([0-9.]+)$', metrics, re.M)
    assert hits is not None and float(hits.group(1)) >= 2


def test_streaming_through_the_router_yields_every_token_and_usage(cluster: Cluster) -> None:
    client = _client(cluster.base)
    stream = client.completions.create(
        model=MODEL, prompt=list(range(1000, 1300)), max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    finishes, usage = [], None
    for chunk in stream:
        if chunk.choices:
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usage = chunk.usage
    assert usage is not None and usage.completion_tokens == 20
    assert finishes[-1] == "length" and finishes.count("length") == 1
