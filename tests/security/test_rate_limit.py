"""The rate limit script (services/common/rate_limit.py) on a real redis-server, against a model of
fixed windows kept in Python, on random sequences; atomic under concurrent callers."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import redis

from services.common.rate_limit import Charge, RateLimiter, RateLimitUnavailable
from services.common.redis_server import RedisServer


def wait_window_start(url: str, margin_s: int = 10) -> None:
    """Sleep into a fresh window when fewer than `margin_s` seconds are left in this one (Redis' clock)."""
    now = int(redis.Redis.from_url(url).time()[0])
    if 60 - now % 60 < margin_s:
        time.sleep(60 - now % 60 + 0.2)


class WindowModel:
    """The reference: per (key, window) counters, the script's rules written plainly."""

    def __init__(self) -> None:
        self.req: dict[tuple[str, int], int] = {}
        self.tok: dict[tuple[str, int], int] = {}

    def admit(self, key: str, window: int, rpm: int, tpm: int, nr: int, nt: int) -> str:
        r, t = self.req.get((key, window), 0), self.tok.get((key, window), 0)
        if tpm and nt > tpm:
            return "too_large"
        if rpm and nr and r + nr > rpm:
            return "requests"
        if tpm and ((nt == 0 and t >= tpm) or (nt and t + nt > tpm)):
            return "tokens"
        self.req[(key, window)] = r + nr
        self.tok[(key, window)] = t + nt
        return ""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_script_matches_the_model_on_random_sequences(redis_server: RedisServer, seed: int) -> None:
    rng = random.Random(seed)
    wait_window_start(redis_server.url, margin_s=15)
    model = WindowModel()
    limits = {f"k{i}": (rng.choice([0, 3, 10]), rng.choice([0, 50, 400])) for i in range(4)}

    async def run() -> list[tuple[str, str]]:
        limiter = RateLimiter(redis_server.url)
        out = []
        try:
            for _ in range(300):
                key = rng.choice(list(limits))
                rpm, tpm = limits[key]
                if rng.random() < 0.5:
                    nr, nt = 1, 0
                else:
                    nr, nt = 0, rng.randint(1, 120)
                v = await limiter.admit(key, rpm, tpm, requests=nr, tokens=nt)
                want = "" if rpm <= 0 and tpm <= 0 else model.admit(key, v.window, rpm, tpm, nr, nt)
                out.append((want, "" if v.allowed else v.limit))
                if not v.allowed:
                    assert 1 <= v.retry_after <= 60
                if (
                    v.allowed and nt and (rpm or tpm) and rng.random() < 0.3
                ):  # a finished request gives some back
                    back = rng.randint(0, nt)
                    await limiter.refund(Charge(key, v.window, nt), back)
                    model.tok[(key, v.window)] -= back
        finally:
            await limiter.close()
        return out

    pairs = asyncio.run(run())
    assert [w for w, _ in pairs] == [g for _, g in pairs]
    assert sum(1 for w, _ in pairs if w) > 20  # the sequence did hit the limits


def test_concurrent_callers_never_overshoot(redis_server: RedisServer) -> None:
    """40 admits at once from two limiters (two replicas) with rpm 7: exactly 7 pass."""
    wait_window_start(redis_server.url)

    async def run() -> list[bool]:
        a, b = RateLimiter(redis_server.url), RateLimiter(redis_server.url)
        try:
            calls = [(a if i % 2 else b).admit("shared", 7, 0, requests=1) for i in range(40)]
            return [v.allowed for v in await asyncio.gather(*calls)]
        finally:
            await a.close()
            await b.close()

    assert sum(asyncio.run(run())) == 7


def test_redis_down_raises_unavailable_then_skips_redis_for_a_while() -> None:
    server = RedisServer().start()
    url = server.url
    server.stop()

    async def run() -> None:
        limiter = RateLimiter(url, retry_s=30.0)
        try:
            with pytest.raises(RateLimitUnavailable):
                await limiter.admit("k", 1, 0, requests=1)
            with pytest.raises(RateLimitUnavailable, match="a moment ago"):  # not asked again yet
                await limiter.admit("k", 1, 0, requests=1)
            assert (await limiter.admit("k", 0, 0, requests=1)).allowed  # no limits: no Redis needed
        finally:
            await limiter.close()

    asyncio.run(run())
