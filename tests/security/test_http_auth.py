"""API keys and rate limits through the official openai client: two router replicas (real apps on
uvicorn) sharing a real redis-server, keys managed by the real CLI; FAKE gRPC workers behind them
(tests/router/fake_workers.py: the workers are not what is tested here)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import redis

from services.common.api_keys import FileKeyStore, KeyStore, RedisKeyStore, hash_key
from services.common.rate_limit import RateLimiter
from services.common.redis_server import RedisServer
from services.router.app import create_app
from services.router.auth import ApiKeyGate
from services.router.key_set import KeySet
from services.router.workers import StaticWorkerPool
from tests.router.conftest import MODEL, RouterServer, router_settings
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel
from tests.security.conftest import add_key, swaserve
from tests.security.test_rate_limit import wait_window_start

REFRESH_S = 0.2
REVOCATION_BOUND_S = 5.0  # REFRESH_S plus a load, with room for a loaded 2-core machine


@dataclass
class Workers:
    prefill: FakePrefillWorker
    decode: FakeDecodeWorker


@pytest.fixture(scope="module")
def workers(toy: ToyModel) -> Iterator[Workers]:
    w = Workers(FakePrefillWorker(toy).start(), FakeDecodeWorker(toy).start())
    yield w
    w.prefill.stop()
    w.decode.stop()


class Replica:
    def __init__(self, model: Path, workers: Workers, store: KeyStore, limits_url: str | None) -> None:
        self.gate = ApiKeyGate(
            KeySet(store, refresh_s=REFRESH_S).start(), RateLimiter(limits_url) if limits_url else None
        )
        pool = StaticWorkerPool([workers.prefill.addr], [workers.decode.addr])
        self.server = RouterServer(create_app(router_settings(model), pool, api_keys=self.gate))
        self.base_url = self.server.base_url

    def client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=20)

    def chat(self, key: str, text: str = "hi", **kw: object) -> openai.types.chat.ChatCompletion:
        return self.client(key).chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": text}],
            **kw,  # type: ignore[call-overload]
        )

    def metrics(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=10).text

    def close(self) -> None:
        self.server.close()
        self.gate.keys.close()


ReplicaFactory = Callable[..., list[Replica]]


@pytest.fixture
def replicas(model_dir: Path, workers: Workers) -> Iterator[ReplicaFactory]:
    made: list[Replica] = []

    def make(store: KeyStore, limits_url: str | None, n: int = 2) -> list[Replica]:
        made.extend(Replica(model_dir, workers, store, limits_url) for _ in range(n))
        return made[-n:]

    yield make
    for r in made:
        r.close()


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def wait_for(check: Callable[[], bool], bound_s: float) -> bool:
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def status_of(replica: Replica, key: str) -> int:
    try:
        replica.chat(key, max_tokens=4)
        return 200
    except openai.APIStatusError as e:
        return e.status_code


def test_keys_required_probes_and_metrics_open(redis_server: RedisServer, replicas: ReplicaFactory) -> None:
    good = add_key("--redis", redis_server.url, name="good")
    a, b = replicas(RedisKeyStore(redis_server.url), redis_server.url)
    for r in (a, b):
        assert (
            r.chat(good, temperature=0).choices[0].message.content
            == "Hello! I am a fake model. The answer is 42."
        )
        with pytest.raises(openai.AuthenticationError) as bad:
            r.chat("sk-swa-" + "x" * 43)
        assert bad.value.status_code == 401
        assert bad.value.body == {  # the OpenAI error object
            "message": "Incorrect API key provided.", "type": "invalid_request_error", "param": None,
            "code": "invalid_api_key",
        }  # fmt: skip
        missing = httpx.post(f"{r.base_url}/v1/chat/completions", json={"model": MODEL, "messages": []})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert missing.json()["error"]["code"] == "invalid_api_key"
        assert "Missing API key" in missing.json()["error"]["message"]
        wrong_scheme = httpx.get(f"{r.base_url}/v1/models", headers={"Authorization": f"Basic {good}"})
        assert wrong_scheme.status_code == 401
        assert (
            httpx.get(f"{r.base_url}/v1/models", headers={"Authorization": f"Bearer {good}"}).status_code
            == 200
        )
        for path in ("/health", "/ready", "/metrics"):  # probes and Prometheus carry no key
            assert httpx.get(f"{r.base_url}{path}").status_code == 200, path
        m = r.metrics()
        assert metric(m, 'swaserve_router_auth_rejected_total{reason="unknown_key"}') == 1
        assert metric(m, 'swaserve_router_auth_rejected_total{reason="missing_key"}') == 2  # no header, Basic
        assert metric(m, "swaserve_router_api_keys ") == 1


def test_requests_per_minute_shared_by_two_replicas(
    redis_server: RedisServer, replicas: ReplicaFactory
) -> None:
    limited = add_key("--redis", redis_server.url, name="limited", rpm=4)
    free = add_key("--redis", redis_server.url, name="free")
    a, b = replicas(RedisKeyStore(redis_server.url), redis_server.url)
    wait_window_start(redis_server.url)
    for i in range(4):
        (a if i % 2 else b).chat(limited, max_tokens=2)
    for r in (a, b):
        with pytest.raises(openai.RateLimitError) as e:
            r.chat(limited, max_tokens=2)
        assert e.value.status_code == 429
        assert 1 <= int(e.value.response.headers["retry-after"]) <= 60
        assert e.value.body["type"] == "requests" and e.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
        assert "limit 4" in e.value.body["message"]  # type: ignore[index]
    assert a.chat(free, max_tokens=2).choices  # another key's budget is its own
    assert metric(a.metrics(), 'swaserve_router_auth_rejected_total{reason="requests"}') == 1


def _tokens_counted(url: str, key: str) -> int:
    r = redis.Redis.from_url(url)
    return sum(int(r.get(k) or 0) for k in r.scan_iter(f"swaserve:ratelimit:{hash_key(key)}:t:*"))


def test_tokens_per_minute_reserved_then_refunded(
    redis_server: RedisServer, replicas: ReplicaFactory
) -> None:
    tpm = 300
    key = add_key("--redis", redis_server.url, name="tok", tpm=tpm)
    small = add_key("--redis", redis_server.url, name="small", tpm=100)
    a, b = replicas(RedisKeyStore(redis_server.url), redis_server.url)
    wait_window_start(redis_server.url)
    used = 0
    for r in (a, b):  # max_tokens 40 is reserved; what was generated stays counted
        u = r.chat(key, max_tokens=40, temperature=0).usage
        assert u is not None and u.completion_tokens < 40
        used += u.prompt_tokens + u.completion_tokens
        assert wait_for(lambda want=used: _tokens_counted(redis_server.url, key) == want, 5.0)
    stream = a.client(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=30, stream=True, temperature=0,
        stream_options={"include_usage": True},
    )  # fmt: skip
    usage = [c.usage for c in stream if c.usage is not None][-1]
    used += usage.prompt_tokens + usage.completion_tokens
    assert wait_for(lambda: _tokens_counted(redis_server.url, key) == used, 5.0)
    room = tpm - used
    with pytest.raises(openai.RateLimitError) as e:  # prompt + max_tokens past what is left
        b.chat(key, max_tokens=room)
    assert e.value.body["type"] == "tokens"  # type: ignore[index]
    assert b.chat(key, max_tokens=room - usage.prompt_tokens).choices  # just fits
    with pytest.raises(openai.RateLimitError, match="Request too large"):  # never fits a minute
        a.chat(small, max_tokens=100)


def test_revocation_and_new_keys_reach_every_replica(
    redis_server: RedisServer, replicas: ReplicaFactory
) -> None:
    key = add_key("--redis", redis_server.url, name="soon-revoked")
    a, b = replicas(RedisKeyStore(redis_server.url), redis_server.url)
    assert status_of(a, key) == status_of(b, key) == 200
    later = add_key("--redis", redis_server.url, name="added-later")
    assert wait_for(lambda: status_of(a, later) == status_of(b, later) == 200, REVOCATION_BOUND_S)
    assert swaserve("keys", "revoke", "--redis", redis_server.url, "soon-revoked").returncode == 0
    assert wait_for(lambda: status_of(a, key) == status_of(b, key) == 401, REVOCATION_BOUND_S)
    assert status_of(a, later) == 200
    assert metric(b.metrics(), 'swaserve_router_auth_rejected_total{reason="revoked_key"}') >= 1


def test_redis_down_keys_from_the_last_set_limits_open(
    redis_server: RedisServer, replicas: ReplicaFactory
) -> None:
    good = add_key("--redis", redis_server.url, name="good", rpm=1000)
    gone = add_key("--redis", redis_server.url, name="gone")
    assert swaserve("keys", "revoke", "--redis", redis_server.url, "gone").returncode == 0
    (a,) = replicas(RedisKeyStore(redis_server.url), redis_server.url, n=1)
    assert status_of(a, good) == 200
    redis_server.stop()
    for _ in range(3):
        assert status_of(a, good) == 200  # rate limits fail open
        assert status_of(a, gone) == 401  # keys: the last loaded set
        assert status_of(a, "sk-swa-unknown") == 401
    m = a.metrics()
    assert metric(m, "swaserve_router_rate_limit_unavailable_total") >= 1
    assert wait_for(lambda: metric(a.metrics(), "swaserve_router_api_keys_refresh_errors_total") >= 1, 5.0)


def test_file_keys_follow_the_cli(tmp_path: Path, replicas: ReplicaFactory) -> None:
    f = str(tmp_path / "keys.json")
    first = add_key("--file", f, name="first")
    (a,) = replicas(FileKeyStore(f), None, n=1)  # no Redis: keys without limits
    assert status_of(a, first) == 200
    second = add_key("--file", f, name="second")
    assert wait_for(lambda: status_of(a, second) == 200, REVOCATION_BOUND_S)
    assert swaserve("keys", "revoke", "--file", f, "first").returncode == 0
    assert wait_for(lambda: status_of(a, first) == 401, REVOCATION_BOUND_S)
    assert status_of(a, second) == 200
