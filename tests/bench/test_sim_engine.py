"""The simulated engine's cache accounting: the same cached-token counts as an independent reference
(unbounded capacity) and as the real Engine with a model (small capacity: evictions, chunking,
batches), on random requests with shared prefixes."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

import pytest

from bench.sim.cost_model import CostModel
from bench.sim.engine import PrefillAborted, SimEngine, SimEngineConfig

PAGE, WINDOW, VOCAB = 4, 8, 256
INSTANT = CostModel(time_scale=1e7)  # simulated seconds take ~nothing


def workload(seed: int, n: int = 60) -> list[list[int]]:
    """Prompts sharing prefixes of a few conversations, cut at random lengths, with new tails."""
    rng = random.Random(seed)
    bases = [[rng.randrange(VOCAB - 1) for _ in range(rng.randrange(40, 90))] for _ in range(4)]
    out = []
    for _ in range(n):
        base = rng.choice(bases)
        cut = rng.randrange(3, len(base) + 1)
        out.append(base[:cut] + [rng.randrange(VOCAB - 1) for _ in range(rng.randrange(0, 14))])
    return out


def reference_cached(prompts: Sequence[Sequence[int]], page: int = PAGE, window: int = WINDOW) -> list[int]:
    """Window-safe hits with unbounded capacity, from sets of token prefixes (no radix tree):
    a finished prompt of n tokens leaves full KV for its pages up to align(n) and SWA KV for the
    pages of [align(align(n) - window), align(n)); a hit of L tokens (L <= align(len - 1)) needs
    full KV for [0, L) and SWA KV for every page overlapping [L - window, L). A prompt whose full
    KV matched further (R > its hit) also leaves SWA KV for the pages of [align(R - window), R):
    the branch point it computed through (the scheduler's checkpoint)."""

    def align(x: int) -> int:
        return max(0, x - x % page)

    full: set[tuple[int, ...]] = set()
    swa: set[tuple[int, ...]] = set()
    hits = []
    for p in prompts:
        best = 0
        for length in range(align(len(p) - 1), 0, -page):
            pages = range(max(0, length - window) // page, length // page)
            if tuple(p[:length]) in full and all(tuple(p[: (j + 1) * page]) in swa for j in pages):
                best = length
                break
        hits.append(best)
        raw = next((n for n in range(align(len(p) - 1), 0, -page) if tuple(p[:n]) in full), 0)
        if raw > best:
            for j in range(align(raw - window) // page, raw // page):
                swa.add(tuple(p[: (j + 1) * page]))
        end = align(len(p))
        for j in range(end // page):
            full.add(tuple(p[: (j + 1) * page]))
            if j * page >= align(end - window):
                swa.add(tuple(p[: (j + 1) * page]))
    return hits


def raw_matches(prompts: Sequence[Sequence[int]], page: int = PAGE) -> list[int]:
    """Longest page-aligned prefix shared with any earlier prompt's cached pages (ignoring SWA)."""
    out = []
    for i, p in enumerate(prompts):
        best = 0
        for q in prompts[:i]:
            k = 0
            while k < min(len(p) - 1, len(q)) and p[k] == q[k]:
                k += 1
            best = max(best, min(k, len(q)) // page * page, 0)
        out.append(min(best, (len(p) - 1) // page * page))
    return out


def sim_cached(cfg: SimEngineConfig, waves: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """Cached tokens per prompt; each wave is submitted at once and finished before the next."""

    async def run() -> list[int]:
        engine = SimEngine(cfg, INSTANT).start()
        out: list[int] = []
        try:
            for w, wave in enumerate(waves):
                futures = [engine.submit(f"w{w}-{i}", p) for i, p in enumerate(wave)]
                out += [o.cached_tokens for o in await asyncio.gather(*futures)]
                engine.cache.check_invariants()
        finally:
            await engine.stop()
        return out

    return asyncio.run(run())


def real_cached(cfg: SimEngineConfig, waves: Sequence[Sequence[Sequence[int]]]) -> list[int]:
    """The same through the real Engine with a tiny MiMo model (tensors and all)."""
    from services.common.sampling_params import SamplingParams
    from services.engine.engine import Engine, EngineConfig
    from tests.engine.tiny_models import mimo_dict, random_model

    model = random_model(mimo_dict(window=WINDOW, vocab=VOCAB), seed=1)
    engine = Engine(
        model, model.config,
        EngineConfig(page_size=cfg.page_size, max_total_tokens=cfg.max_total_tokens, chunk_size=cfg.chunk_size,
                     max_batch_tokens=cfg.max_batch_tokens, max_running=cfg.max_running),
    )  # fmt: skip
    out = []
    for wave in waves:
        reqs = engine.generate([list(p) for p in wave], SamplingParams(max_tokens=1, temperature=0.0))
        out += [r.cached_len for r in reqs]
    return out


def unbounded() -> SimEngineConfig:
    return SimEngineConfig(page_size=PAGE, window=WINDOW, max_total_tokens=1 << 16, swa_pages=1 << 14,
                           max_context=4096)  # fmt: skip


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbounded_cache_hits_equal_the_prefix_set_reference(seed: int) -> None:
    prompts = workload(seed)
    got = sim_cached(unbounded(), [[p] for p in prompts])
    want = reference_cached(prompts)
    assert got == want
    assert sum(1 for h in want if h) >= 10  # the workload does hit the cache
    # window safety matters: some raw matches are not hits (their SWA tail was never kept)
    assert any(h < r for h, r in zip(want, raw_matches(prompts), strict=True))


SMALL = SimEngineConfig(page_size=PAGE, window=WINDOW, max_total_tokens=192, chunk_size=16, max_batch_tokens=40,
                        max_running=4, max_context=4096)  # fmt: skip


@pytest.mark.parametrize("seed", [3, 4])
def test_small_capacity_matches_the_real_engine_one_at_a_time(seed: int) -> None:
    prompts = workload(seed)
    got = sim_cached(SMALL, [[p] for p in prompts])
    assert got == real_cached(SMALL, [[p] for p in prompts])
    assert got != reference_cached(prompts)  # evictions took hits away


def test_batches_chunks_and_evictions_match_the_real_engine() -> None:
    prompts = workload(5, n=48)
    waves = [prompts[i : i + 6] for i in range(0, len(prompts), 6)]
    got = sim_cached(SMALL, waves)
    assert got == real_cached(SMALL, waves)
    assert any(got)


@pytest.mark.parametrize("policy, short_first", [("fcfs", False), ("uncached-first", True)])
def test_the_queue_policy_is_the_real_one(policy: str, short_first: bool) -> None:
    cfg = SimEngineConfig(
        page_size=PAGE, window=WINDOW, chunk_size=64, max_batch_tokens=64, queue_policy=policy
    )

    async def run() -> tuple[float, float]:
        engine = SimEngine(cfg, CostModel(time_scale=100)).start()
        long = engine.submit("long", list(range(1, 201)))
        short = engine.submit("short", list(range(300, 340)))
        a, b = await asyncio.gather(long, short)
        await engine.stop()
        return a.finished_at, b.finished_at

    long_done, short_done = asyncio.run(run())
    assert (short_done < long_done) is short_first


def test_an_abort_before_the_first_token_frees_everything() -> None:
    async def run() -> None:
        engine = SimEngine(SimEngineConfig(page_size=PAGE, window=WINDOW, chunk_size=32, max_batch_tokens=32),
                           CostModel()).start()  # 13 steps of >= 5 ms  # fmt: skip
        fut = engine.submit("a", list(range(1, 400)))
        await asyncio.sleep(0.01)
        assert engine.abort("a") and not engine.abort("unknown")
        with pytest.raises(PrefillAborted):
            await fut
        await asyncio.sleep(0.01)
        assert engine.load.running == engine.load.waiting == engine.load.queued_tokens == 0
        engine.cache.check_invariants()
        assert engine.cache.evictable_full_pages() == engine.full_pool.num_used  # only the cache holds pages
        await engine.stop()

    asyncio.run(run())


@pytest.mark.parametrize(
    "prompt, error", [([], "at least one token"), ([1, -2], "ids >= 0"), (list(range(5000)), "context")]
)
def test_bad_prompts_are_refused_before_queueing(prompt: list[int], error: str) -> None:
    async def run() -> None:
        engine = SimEngine(unbounded(), INSTANT)
        with pytest.raises(ValueError, match=error):
            engine.submit("x", prompt)
        assert not engine.scheduler.has_work()

    asyncio.run(run())
