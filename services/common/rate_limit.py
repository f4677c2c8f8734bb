"""Per-key rate limits in Redis, shared by every router replica (docs/security.md).

Fixed one-minute windows on Redis' own clock (`TIME`, so replicas with skewed clocks agree): the
window of second `now` is `now - now % 60`; each key has a request counter and a token counter per
window, both expiring after two minutes. One Lua script checks and counts atomically, so two
replicas can never both take the last unit of a budget. A fixed window lets a client spend up to
twice its limit across a window edge (the end of one window and the start of the next); in return
a refusal's Retry-After is exact: the seconds left in the window.

    admit(key, rpm, tpm, requests=1)      at the door: one request, refused while the
                                           window's tokens are already spent
    admit(key, rpm, tpm, tokens=n)        once the prompt is tokenized: n tokens reserved
    refund(charge, n)                     what a finished request did not use goes back

Redis unreachable: `admit` raises RateLimitUnavailable; the caller decides (the router lets the
request through, logs and counts it) and the limiter does not try Redis again for `retry_s`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

WINDOW_S = 60

_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1])
local win = now - (now % 60)
local rk = KEYS[1] .. ':r:' .. win
local tk = KEYS[1] .. ':t:' .. win
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local nr, nt = tonumber(ARGV[3]), tonumber(ARGV[4])
local retry = 60 - (now % 60)
local r = tonumber(redis.call('GET', rk) or '0')
local tok = tonumber(redis.call('GET', tk) or '0')
if tpm > 0 and nt > tpm then return {0, retry, 'too_large', win} end
if rpm > 0 and nr > 0 and r + nr > rpm then return {0, retry, 'requests', win} end
if tpm > 0 and ((nt == 0 and tok >= tpm) or (nt > 0 and tok + nt > tpm)) then
  return {0, retry, 'tokens', win}
end
if nr > 0 then redis.call('INCRBY', rk, nr); redis.call('EXPIRE', rk, 120) end
if nt > 0 then redis.call('INCRBY', tk, nt); redis.call('EXPIRE', tk, 120) end
return {1, 0, '', win}
"""

_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECRBY', KEYS[1], ARGV[1]) end
return 0
"""


class RateLimitUnavailable(Exception):
    """Redis could not be asked (down, slow, or skipped for a while after such a failure)."""


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # seconds until the window ends (refusals only)
    limit: str = ""  # "requests" | "tokens" | "too_large" (refusals only)
    window: int = 0  # the window the charge went into (Redis time, seconds)


@dataclass(frozen=True)
class Charge:
    """Tokens counted against `key` in `window`; refund() gives back part of them."""

    key: str
    window: int
    tokens: int


class RateLimiter:
    def __init__(
        self, redis_url: str, prefix: str = "swaserve:ratelimit", timeout_s: float = 0.5, retry_s: float = 1.0
    ) -> None:
        self.client: Any = aioredis.Redis.from_url(
            redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.prefix = prefix
        self.retry_s = retry_s
        self._admit = self.client.register_script(_ADMIT)
        self._refund = self.client.register_script(_REFUND)
        self._skip_until = 0.0

    def _key(self, key_hash: str) -> str:
        return f"{self.prefix}:{key_hash}"

    async def admit(self, key_hash: str, rpm: int, tpm: int, requests: int = 0, tokens: int = 0) -> Verdict:
        if rpm <= 0 and tpm <= 0:
            return Verdict(True)
        out = await self._call(self._admit, [self._key(key_hash)], [rpm, tpm, requests, tokens])
        allowed, retry, limit, window = out
        return Verdict(bool(allowed), int(retry), limit.decode() if isinstance(limit, bytes) else str(limit),
                       int(window))  # fmt: skip

    async def refund(self, charge: Charge, tokens: int) -> None:
        if tokens > 0:
            await self._call(self._refund, [f"{self._key(charge.key)}:t:{charge.window}"], [tokens])

    async def _call(self, script: Any, keys: list[str], args: list[int]) -> Any:
        if time.monotonic() < self._skip_until:
            raise RateLimitUnavailable("Redis failed a moment ago")
        try:
            return await script(keys=keys, args=args)
        except (redis.RedisError, OSError) as e:
            self._skip_until = time.monotonic() + self.retry_s
            raise RateLimitUnavailable(str(e)) from e

    async def close(self) -> None:
        await self.client.aclose()
