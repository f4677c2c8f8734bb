"""The simulated decode worker's bookkeeping: Reserve arithmetic in KV tokens, expiry, the running
limit, aborts, and streams of exactly max_tokens."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.sim.cost_model import CostModel
from bench.sim.decode import SimDecoder, TokenChunk
from bench.sim.tokens import output_tokens
from services.common.worker_errors import ErrorKind, WorkerError

FAST = CostModel(time_scale=100)


async def collect(decoder: SimDecoder, rid: str, prompt: list[int], max_tokens: int) -> list[TokenChunk]:
    return [c async for c in decoder.decode(rid, prompt, max_tokens)]


def test_reserve_counts_prompt_plus_max_tokens_against_capacity() -> None:
    async def run() -> None:
        d = SimDecoder(1000, 8, FAST)
        assert d.reserve("a", 400, 100) == (True, "")
        assert d.reserve("b", 400, 100) == (True, "")
        ok, reason = d.reserve("c", 1, 1)
        assert not ok and "0 available" in reason
        ok, reason = d.reserve("d", 1000, 1)
        assert not ok and "holds 1000 in all" in reason
        assert d.abort("a") and d.snapshot["free_kv_tokens"] == 500
        assert d.reserve("c", 300, 200) == (True, "")
        with pytest.raises(WorkerError) as e:
            d.reserve("", 1, 1)
        assert e.value.kind is ErrorKind.INVALID

    asyncio.run(run())


def test_reservations_expire_after_their_ttl() -> None:
    async def run() -> None:
        d = SimDecoder(100, 8, FAST, reserve_ttl=0.05)
        assert d.reserve("a", 50, 50)[0]
        assert not d.reserve("b", 10, 10)[0]
        time.sleep(0.06)
        assert d.reserve("b", 10, 10)[0]

    asyncio.run(run())


def test_a_stream_has_exactly_max_tokens_and_releases_its_kv() -> None:
    async def run() -> None:
        d = SimDecoder(1000, 8, FAST)
        assert d.reserve("a", 10, 25)[0]
        chunks = await collect(d, "a", list(range(10)), 25)
        ids = [t for c in chunks for t in c.token_ids]
        assert ids == output_tokens(list(range(10)), 24, start=1)  # the first came from prefill
        assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 25
        assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
        assert d.available_tokens() == 1000 and d.generated_tokens == 24

    asyncio.run(run())


def test_decode_without_a_reservation_needs_room_now() -> None:
    async def run() -> None:
        d = SimDecoder(100, 8, FAST)
        assert d.reserve("big", 60, 30)[0]
        with pytest.raises(WorkerError) as e:
            await collect(d, "x", list(range(20)), 5)
        assert e.value.kind is ErrorKind.EXHAUSTED
        assert len(await collect(d, "y", list(range(5)), 5)) >= 1  # 10 tokens fit

    asyncio.run(run())


def test_at_most_max_running_decode_at_once() -> None:
    async def run() -> None:
        d = SimDecoder(10_000, 2, CostModel(time_scale=20))
        tasks = [asyncio.ensure_future(collect(d, f"r{i}", [i + 1], 10)) for i in range(5)]
        for _ in range(20):  # every request submitted; no wall time passes, so no step ends (a loaded
            await asyncio.sleep(0)  # machine once slept 5 ms long enough for a request to finish)
        assert (d.running, d.waiting) == (2, 3)
        done = await asyncio.gather(*tasks)
        assert all(c[-1].completion_tokens == 10 for c in done)
        assert (d.running, d.waiting) == (0, 0)

    asyncio.run(run())


def test_abort_ends_a_running_stream() -> None:
    async def run() -> None:
        d = SimDecoder(10_000, 2, CostModel(time_scale=1))
        task = asyncio.ensure_future(collect(d, "a", [1, 2, 3], 1000))
        await asyncio.sleep(0.05)
        assert d.abort("a")
        chunks = await asyncio.wait_for(task, 1.0)
        assert chunks[-1].finish_reason == "abort" and chunks[-1].completion_tokens < 1000
        assert d.available_tokens() == 10_000

    asyncio.run(run())
