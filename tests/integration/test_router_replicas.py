"""Two router replicas over one Redis (LLM-Router: "two router replicas agree; one killed mid-run
loses no request that had not started streaming"), on a real local cluster of mimo-tiny workers.

Replica A is the router of `swaserve up --redis-url R --prefill 2 --decode 1`; replica B is a second
`python -m services.router.main` against the same Redis R (a RedisServer this module starts).

- Agreement: each request of a sequence (fresh prompts, then follow-up turns that repeat them as a
  prefix) goes to A and to B at the same moment, from the same shared state; the prefill workers'
  own request counters show that both copies were served by the same worker, follow-ups by the
  worker that holds their prefix (which reports it as cached), which both replicas count as a
  cache hit.
- Failover: concurrent streams split over A and B with the official openai client; A is SIGKILLed
  while some of its streams are mid-way and others are still in Reserve/Prefill. With the client
  policy "retry on the other replica if no token arrived yet" every request completes, except the
  ones that had already streamed from A, which end with an error; B's own streams are untouched.
  Afterwards nothing is held on the workers: the decode worker's free KV (Health RPC) returns to its
  value before the run. A Prefill the dead router's dropped RPC cancelled while its KV was on the way
  makes the prefill worker tell the decode worker to drop that KV at once; what is left (reservations
  whose Prefill never started, KV whose Decode never came) expires after the TTLs this test gives
  `swaserve up` (--decode-reserve-ttl / --decode-pending-ttl, 15 s here, 30 s / 60 s by default).

`swaserve up` restarts the killed router on its port after a second; nothing here uses it again.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from services.common.netutil import free_port
from services.common.redis_server import RedisServer
from services.common.registry import WorkerRecord, WorkerRegistry
from services.proto_gen import worker_pb2, worker_pb2_grpc

MODEL = "mimo-tiny"
PAGE = 16  # the workers' and the routers' default page size
RESERVE_TTL, PENDING_TTL = 15.0, 15.0  # passed to swaserve up (the decode worker's defaults: 30, 60)


def _wait_for(
    what: str, check: Callable[[], bool], timeout: float, diag: Callable[[], str] = str, every: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{diag()}")
        time.sleep(every)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return f"---- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
    except OSError:
        return f"---- {path.name}: unreadable"


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=10).text


@dataclass
class Cluster:
    a: str  # replica A: swaserve up's router
    b: str  # replica B: our own router process
    a_pid: int  # A's process (its own process group: swaserve up starts each child in a new session)
    registry: WorkerRegistry
    logs: Path

    def workers(self, role: str) -> list[WorkerRecord]:
        return [r for r in self.registry.list(model=MODEL) if r.role == role]

    def diag(self) -> str:
        return "\n".join(_tail(p) for p in sorted(self.logs.glob("*.log")))


def _healthy(url: str) -> bool:
    try:
        h = httpx.get(f"{url}/health", timeout=2).json()
        usable = _metric(_metrics(url), "swaserve_router_index_usable") == 1
    except (httpx.HTTPError, ValueError):
        return False
    return (
        h.get("status") == "ok" and h.get("prefill_workers") == 2 and h.get("decode_workers") == 1 and usable
    )


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp("replicas")
    redis = RedisServer(log_path=logs / "redis.log").start()
    procs: list[subprocess.Popen[bytes]] = []
    registry = WorkerRegistry(redis.url)
    try:
        port_a, port_b = free_port(), free_port()
        up_argv = [sys.executable, "-m", "swaserve", "up", "--model", MODEL, "--port", str(port_a),
                   "--redis-url", redis.url, "--prefill", "2", "--decode", "1", "--run-dir", str(logs),
                   "--decode-reserve-ttl", str(RESERVE_TTL), "--decode-pending-ttl", str(PENDING_TTL)]  # fmt: skip
        b_argv = [sys.executable, "-m", "services.router.main", "--port", str(port_b), "--model", MODEL,
                  "--redis-url", redis.url]  # fmt: skip
        for argv, log in ((up_argv, logs / "up.out"), (b_argv, logs / "router-b.log")):
            with log.open("w") as out:
                procs.append(
                    subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                )
        a, b = f"http://127.0.0.1:{port_a}", f"http://127.0.0.1:{port_b}"

        def diag() -> str:
            return _tail(logs / "up.out") + "\n" + "\n".join(_tail(p) for p in sorted(logs.glob("*.log")))

        def ready() -> bool:
            for name, p in zip(("swaserve up", "router B"), procs, strict=True):
                if p.poll() is not None:
                    raise AssertionError(f"{name} exited with {p.returncode}\n{diag()}")
            return _healthy(a) and _healthy(b)

        _wait_for("both routers healthy with 2 prefill and 1 decode worker", ready, 240, diag)
        m = re.search(r"started router \(pid (\d+)", (logs / "up.out").read_text())
        assert m, diag()
        yield Cluster(a, b, int(m.group(1)), registry, logs)
    finally:
        for p in reversed(procs):  # B, then swaserve up (router, workers)
            _stop_group(p)
        registry.redis.close()
        redis.stop()


# -- shared-state helpers ---------------------------------------------------------------------------
def _routers_idle(routers: list[str], c: Cluster) -> bool:
    """Every replica's registry snapshot shows idle workers, and so does Redis (checked after: a busy
    record a replica has not picked up yet would have been written < 0.5 s ago, and the next idle
    one is a heartbeat interval, 2 s, later), so the replicas see the same loads until new work."""
    for url in routers:
        text = _metrics(url)
        if _metric(text, "swaserve_router_inflight_requests") > 0:
            return False
        for role in ("prefill", "decode"):
            for name in ("running_requests", "queued_requests", "queued_tokens"):
                if _metric(text, f'swaserve_router_{name}{{role="{role}"}}') > 0:
                    return False
    records = c.registry.list(model=MODEL)
    return len(records) == 3 and all(
        r.running == 0 and r.waiting == 0 and r.queued_tokens == 0 and r.free_kv_tokens == r.capacity_tokens
        for r in records
    )


def _served(c: Cluster) -> dict[str, float]:
    """Prefill requests each prefill worker completed (its own /metrics), by worker id."""
    return {
        r.worker_id: _metric(
            httpx.get(f"http://{r.metrics_addr}/metrics", timeout=10).text,
            'swaserve_prefill_requests_total{outcome="ok"}',
        )
        for r in c.workers("prefill")
    }


def _decisions(url: str) -> dict[str, float]:
    text = _metrics(url)
    reasons = ("cache_hit", "load_over_cache", "cache_miss", "index_unavailable", "no_index")
    return {r: _metric(text, f'swaserve_router_decisions_total{{reason="{r}"}}') for r in reasons}


def _health(addr: str, role: str) -> worker_pb2.HealthReply:
    with grpc.insecure_channel(addr) as ch:
        stub = (
            worker_pb2_grpc.DecodeWorkerStub(ch)
            if role == "decode"
            else worker_pb2_grpc.PrefillWorkerStub(ch)
        )
        reply: worker_pb2.HealthReply = stub.Health(worker_pb2.HealthRequest(), timeout=5)
        return reply


# -- 1. agreement -----------------------------------------------------------------------------------
def test_replicas_send_the_same_request_to_the_same_worker(cluster: Cluster) -> None:
    c = cluster
    rng = random.Random(2024)
    # 10 fresh prompts (ties between the idle workers, broken by a hash of the prompt), then follow-up
    # turns of some of them (routed by their cached prefix)
    convs = [[rng.randrange(100, 100_000) for _ in range(140 + 23 * i)] for i in range(10)]
    turns = {0: range(10), 1: range(5), 2: range(3)}
    holder: dict[int, str] = {}  # conversation -> the prefill worker that served its first turn
    decisions_before = {u: _decisions(u) for u in (c.a, c.b)}
    barrier = threading.Barrier(2)

    def send(url: str, prompt: list[int]) -> httpx.Response:
        with httpx.Client(base_url=url, timeout=120) as h:
            barrier.wait(timeout=30)
            return h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})

    # turns: every fresh conversation first, then the follow-ups, so that the KV events of a turn
    # have reached both replicas' indexes (milliseconds) long before its next turn is routed
    with ThreadPoolExecutor(2) as pool:
        for turn in range(3):
            for i in turns[turn]:
                conv = convs[i]
                prev = len(conv)
                if turn:
                    conv += [rng.randrange(100, 100_000) for _ in range(40)]  # the next user message
                _wait_for(
                    "idle workers in every replica's view", lambda: _routers_idle([c.a, c.b], c), 30, c.diag
                )
                before = _served(c)
                ra, rb = (f.result() for f in [pool.submit(send, u, list(conv)) for u in (c.a, c.b)])
                assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
                after = _served(c)
                got = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
                # both copies on one worker: A and B chose alike
                assert list(got.values()) == [2], (turn, i, got)
                (worker,) = got
                if not turn:
                    holder[i] = worker
                    continue
                assert worker == holder[i], (turn, i, worker, holder)  # back where the prefix is cached
                for r in (ra, rb):
                    cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                    assert cached >= prev // PAGE * PAGE - PAGE, (turn, i, prev, cached)
    # both replicas routed every follow-up by its cached prefix, and nothing by load alone (a fresh
    # prompt's copy may count as a hit on one replica if the other copy's KV events came first)
    n, follow_ups = sum(map(len, turns.values())), len(turns[1]) + len(turns[2])
    for url in (c.a, c.b):
        d = {k: v - decisions_before[url][k] for k, v in _decisions(url).items()}
        hits, misses = d["cache_hit"], d["cache_miss"]
        assert hits >= follow_ups and hits + misses == sum(d.values()) == n, (url, d)
    spread = sorted(list(holder.values()).count(w) for w in set(holder.values()))
    print(f"\nfirst turns per prefill worker: {spread}")


# -- 2. failover ------------------------------------------------------------------------------------
@dataclass
class Attempt:
    replica: str
    chunks: int = 0  # chunks with a choice (tokens) received
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str = ""
    ended_at: float = 0.0


@dataclass
class Req:
    name: str
    start: str  # "A" | "B"
    prompt: list[int]
    max_tokens: int
    first: threading.Event = field(default_factory=threading.Event)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def completed(self) -> bool:
        last = self.attempts[-1] if self.attempts else None
        return bool(last and not last.error and last.completion_tokens == self.max_tokens)


def _stream_once(client: openai.OpenAI, req: Req, att: Attempt) -> None:
    try:
        stream = client.completions.create(
            model=MODEL, prompt=req.prompt, max_tokens=req.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        with stream:
            for chunk in stream:
                if chunk.choices:
                    att.chunks += 1
                    req.first.set()
                    att.finish_reason = chunk.choices[0].finish_reason or att.finish_reason
                if chunk.usage is not None:
                    att.completion_tokens = chunk.usage.completion_tokens
        if att.finish_reason is None or att.completion_tokens != req.max_tokens:
            att.error = f"stream ended early ({att.finish_reason}, {att.completion_tokens} tokens)"
    except Exception as e:  # noqa: BLE001 - any failure is an outcome to classify
        att.error = f"{type(e).__name__}: {e}"
    att.ended_at = time.monotonic()


def _run_with_failover(clients: dict[str, openai.OpenAI], req: Req) -> None:
    """The client policy: on a failure before the first token, retry once on the other replica."""
    for replica in (req.start, "B" if req.start == "A" else "A"):
        att = Attempt(replica)
        req.attempts.append(att)
        _stream_once(clients[replica], req, att)
        if not att.error or att.chunks:
            return


def test_killing_a_replica_loses_no_request_that_had_not_started_streaming(cluster: Cluster) -> None:
    c = cluster
    rng = random.Random(77)
    (decode,) = c.workers("decode")
    prefills = c.workers("prefill")
    _wait_for("idle workers in every replica's view", lambda: _routers_idle([c.a, c.b], c), 30, c.diag)
    base_decode = _health(decode.addr, "decode")
    assert base_decode.running == 0 and base_decode.free_kv_tokens == decode.capacity_tokens, base_decode
    b_ok_before = _metric(
        _metrics(c.b), 'swaserve_router_requests_total{endpoint="/v1/completions",status="200"}'
    )

    def fresh(n: int) -> list[int]:
        return [rng.randrange(100, 100_000) for _ in range(n)]

    # wave 1: streams that are mid-way when A dies; wave 2: long prompts, still in Reserve/Prefill
    max_tokens = 128
    wave1 = [Req(f"w1-{s}{i}", s, fresh(120 + 8 * i), max_tokens) for s in "AB" for i in range(3)]
    wave2 = [Req(f"w2-A{i}", "A", fresh(1000 + 16 * i), max_tokens) for i in range(3)]
    wave2.append(Req("w2-B0", "B", fresh(1000), max_tokens))
    reqs = wave1 + wave2
    timeout = 120.0
    clients = {
        "A": openai.OpenAI(base_url=f"{c.a}/v1", api_key="none", max_retries=0, timeout=timeout),
        "B": openai.OpenAI(base_url=f"{c.b}/v1", api_key="none", max_retries=0, timeout=timeout),
    }
    with ThreadPoolExecutor(len(reqs)) as pool:
        futures = [pool.submit(_run_with_failover, clients, r) for r in wave1]
        _wait_for(
            "a first token on every wave-1 stream", lambda: all(r.first.is_set() for r in wave1), 60, c.diag
        )
        futures += [pool.submit(_run_with_failover, clients, r) for r in wave2]
        on_a = sum(r.start == "A" for r in reqs)

        def all_of_a_inside() -> bool:  # A serves every request sent to it (wave 1 still streaming)
            return _metric(_metrics(c.a), "swaserve_router_inflight_requests") >= on_a

        _wait_for("A serving all of its requests", all_of_a_inside, 30, c.diag)
        killed_at = time.monotonic()
        os.killpg(c.a_pid, signal.SIGKILL)
        for f in futures:
            f.result(timeout=150)

    report = "\n".join(f"{r.name}: {r.attempts}" for r in reqs)
    streamed_then_failed, retried = [], []
    for r in reqs:
        first = r.attempts[0]
        if r.start == "B":  # B's streams never noticed
            assert len(r.attempts) == 1 and r.completed and first.finish_reason == "length", report
            continue
        assert first.error, f"{r.name} finished on A although A was killed mid-stream\n{report}"
        assert first.ended_at >= killed_at, report  # A's requests failed because A died, not before
        if first.chunks:  # had streamed from A: the stream ends in an error, not retried
            assert len(r.attempts) == 1, report
            streamed_then_failed.append(r.name)
        else:  # no token yet: the retry on B completes it
            assert len(r.attempts) == 2 and r.attempts[1].replica == "B" and r.completed, report
            retried.append(r.name)
    # the kill was mid-run: both kinds of A request were there
    assert {f"w1-A{i}" for i in range(3)} <= set(streamed_then_failed), report
    assert retried, report
    b_ok = _metric(_metrics(c.b), 'swaserve_router_requests_total{endpoint="/v1/completions",status="200"}')
    assert b_ok - b_ok_before == sum(r.start == "B" for r in reqs) + len(retried), report

    # nothing leaks: what the dead router had reserved or shipped expires on the decode worker
    def released() -> bool:
        d = _health(decode.addr, "decode")
        if (d.running, d.waiting, d.free_kv_tokens) != (0, 0, base_decode.free_kv_tokens):
            return False
        return all(
            (h.running, h.waiting, h.free_kv_tokens) == (0, 0, p.capacity_tokens)
            for p in prefills
            for h in [_health(p.addr, "prefill")]
        )

    def state() -> str:
        text = httpx.get(f"http://{decode.metrics_addr}/metrics", timeout=10).text
        held = [
            ln
            for ln in text.splitlines()
            if ln.startswith(("swaserve_decode_reserved", "swaserve_decode_pending"))
        ]
        return f"decode {_health(decode.addr, 'decode')}\n" + "\n".join(held) + f"\n{report}\n{c.diag()}"

    left = max(RESERVE_TTL, PENDING_TTL) + 10 - (time.monotonic() - killed_at)
    _wait_for("the workers' KV back to its value before the run", released, left, state, every=0.25)
    print(
        f"\nstreamed then failed: {streamed_then_failed}; retried on B: {retried}; "
        f"KV released {time.monotonic() - killed_at:.1f}s after the kill"
    )
