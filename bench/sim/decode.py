"""Simulated decoding: output tokens paced by the cost model, and a decode worker's KV admission.

`paced_tokens` yields a completion's tokens after the first, each due DECODE_TPOT after the one
before (simulated time), in chunks no more often than every `min_interval_s` of wall clock.

`SimDecoder` is the decode worker's bookkeeping, with the real worker's arithmetic in KV tokens:

    held      = sum(prompt_len + max_tokens) of reservations and running decodes
    Reserve ok  <=>  prompt_len + max_tokens <= capacity - held

(for a running request `used + growth` is exactly its prompt_len + max_tokens). No KV arrives: the
simulated prefill worker ships none, so Decode starts at once. At most `max_running` decode at a
time; the others wait for a slot (first come, first served).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from bench.sim.clock import SimClock
from bench.sim.cost_model import CostModel
from bench.sim.tokens import output_tokens
from services.common.worker_errors import ErrorKind, WorkerError

MIN_CHUNK_INTERVAL_S = 0.01  # wall clock between two chunks of one stream


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    completion_tokens: int  # so far, the first token included
    finish_reason: str = ""  # "length" on the last chunk (a simulation has no EOS)


async def paced_tokens(
    prompt_ids: Sequence[int],
    max_tokens: int,
    cost: CostModel,
    clock: SimClock,
    started: float | None = None,
    min_interval_s: float = MIN_CHUNK_INTERVAL_S,
    seed: int = 0,
) -> AsyncIterator[TokenChunk]:
    """Tokens 2..max_tokens of the completion; `started` (simulated) is when the first was known."""
    t0 = clock.now() if started is None else started
    rest = output_tokens(prompt_ids, max(0, max_tokens - 1), start=1, seed=seed)
    sent = 0
    while True:
        due = min(len(rest), int((clock.now() - t0) / cost.decode_tpot_s + 1e-9))
        if due > sent or not rest:
            last = due == len(rest)
            yield TokenChunk(tuple(rest[sent:due]), 1 + due, "length" if last else "")
            sent = due
            if last:
                return
        next_due = t0 + (sent + 1) * cost.decode_tpot_s
        await clock.sleep_until(max(next_due, clock.now() + min_interval_s * clock.time_scale))


@dataclass
class _Hold:
    tokens: int
    expires: float  # wall clock; inf once decoding


class SimDecoder:
    def __init__(
        self, capacity_tokens: int, max_running: int, cost: CostModel, reserve_ttl: float = 30.0
    ) -> None:
        if capacity_tokens < 1 or max_running < 1:
            raise ValueError("capacity_tokens and max_running must be >= 1")
        self.capacity_tokens = capacity_tokens
        self.max_running = max_running
        self.cost = cost
        self.clock = SimClock(cost.time_scale)
        self.reserve_ttl = reserve_ttl
        self._holds: dict[str, _Hold] = {}
        self._slots = asyncio.Semaphore(max_running)
        self._aborted: set[str] = set()  # decoding requests that Abort ended
        self.running = 0
        self.waiting = 0
        self.generated_tokens = 0
        self.on_change: list[Callable[[], None]] = []  # e.g. the registry's notify
        self.snapshot = self.load()  # read by other threads (the registry heartbeat)

    # -- admission -----------------------------------------------------------------------------
    def held_tokens(self) -> int:
        self._expire()
        return sum(h.tokens for h in self._holds.values())

    def available_tokens(self) -> int:
        return self.capacity_tokens - self.held_tokens()

    def reserve(self, rid: str, prompt_len: int, max_tokens: int) -> tuple[bool, str]:
        if not rid or prompt_len < 1 or max_tokens < 1:
            raise WorkerError(
                ErrorKind.INVALID, f"{rid!r}: Reserve needs a rid, prompt_len >= 1, max_tokens >= 1"
            )
        need = prompt_len + max_tokens
        if need > self.capacity_tokens:
            return False, f"{rid} needs {need} KV tokens; this worker holds {self.capacity_tokens} in all"
        old = self._holds.pop(rid, None)
        available = self.available_tokens()
        if need > available:
            if old is not None:
                self._holds[rid] = old
            return False, f"{rid} needs {need} KV tokens; {max(0, available)} available now"
        self._holds[rid] = _Hold(need, time.monotonic() + self.reserve_ttl)
        self.refresh()
        return True, ""

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, h in self._holds.items() if h.expires <= now]:
            del self._holds[rid]

    # -- decoding ------------------------------------------------------------------------------
    async def decode(
        self, rid: str, prompt_ids: Sequence[int], max_tokens: int
    ) -> AsyncGenerator[TokenChunk, None]:
        """The stream of one request (its first token came from prefill). Closing it early aborts."""
        if not rid or not prompt_ids:
            raise WorkerError(ErrorKind.INVALID, "Decode needs a rid and the prompt ids")
        need = len(prompt_ids) + max_tokens
        if rid not in self._holds:  # no Reserve first: take it only if it fits now
            if need > self.available_tokens():
                raise WorkerError(
                    ErrorKind.EXHAUSTED, f"{rid}: no reservation and no room for {need} KV tokens"
                )
        self._holds[rid] = _Hold(need, float("inf"))
        try:
            if max_tokens <= 1:
                yield TokenChunk((), 1, "length")
                return
            self.waiting += 1
            self.refresh()
            try:
                await self._slots.acquire()
            finally:
                self.waiting -= 1
            self.running += 1
            self.refresh()
            try:
                async for chunk in paced_tokens(prompt_ids, max_tokens, self.cost, self.clock):
                    if rid in self._aborted:
                        yield TokenChunk((), chunk.completion_tokens - len(chunk.token_ids), "abort")
                        return
                    self.generated_tokens += len(chunk.token_ids)
                    yield chunk
            finally:
                self.running -= 1
                self._slots.release()
        finally:
            self._holds.pop(rid, None)
            self._aborted.discard(rid)
            self.refresh()

    def abort(self, rid: str) -> bool:
        """Drop a reservation, or end a running stream (its next chunk says "abort")."""
        hold = self._holds.get(rid)
        if hold is None:
            return False
        if hold.expires == float("inf"):
            self._aborted.add(rid)
        else:
            del self._holds[rid]
            self.refresh()
        return True

    def refresh(self) -> None:
        """Take a new load snapshot (expiring old reservations) and tell on_change."""
        self.snapshot = self.load()
        for hook in self.on_change:
            hook()

    def load(self) -> dict[str, int]:
        return {
            "running": self.running,
            "waiting": self.waiting,
            "free_kv_tokens": max(0, self.available_tokens()),
            "queued_tokens": 0,
        }
