"""The cost model: prefill grows with uncached tokens, cached tokens are cheaper, the time scale divides
every service time, and the constants reproduce the published figures they were calibrated on."""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.sim.clock import SimClock
from bench.sim.cost_model import (
    CALIBRATION_PREFILL_INPUT_LEN,
    CALIBRATION_PREFILL_TOKENS_PER_S,
    EFFECTIVE_FLOPS_PER_NODE,
    CostModel,
    _window_ctx,
    deepseek_v3_flops_per_token,
    mimo_v2_flash,
)
from bench.sim.decode import paced_tokens

COST = CostModel()


def test_prefill_time_grows_with_uncached_tokens() -> None:
    lengths = [16, 128, 512, 2048, 8192, 32768, 131072]
    times = [COST.prefill_seconds(n) for n in lengths]
    assert times == sorted(times) and len(set(times)) == len(times)
    # superlinear at long context: the full-attention layers see the whole prefix
    assert times[-1] / lengths[-1] > times[-3] / lengths[-3]


@pytest.mark.parametrize("prompt", [512, 4096, 65536])
def test_cached_tokens_are_cheaper_but_not_free_of_their_context(prompt: int) -> None:
    cached = [0, prompt // 4, prompt // 2, prompt - 16]
    times = [COST.prefill_seconds(prompt, cached=c) for c in cached]
    assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
    # the last 16 tokens after a long cached prefix cost more than 16 tokens of a fresh prompt
    assert times[-1] > COST.prefill_seconds(16)


def test_the_calibration_reproduces_the_published_prefill_figure() -> None:
    # 52.3k input tokens/s per node for DeepSeek-V3 at 2000-token inputs (LMSYS large-scale EP post)
    tps = EFFECTIVE_FLOPS_PER_NODE / deepseek_v3_flops_per_token(CALIBRATION_PREFILL_INPUT_LEN)
    assert tps == pytest.approx(CALIBRATION_PREFILL_TOKENS_PER_S)
    assert CALIBRATION_PREFILL_TOKENS_PER_S == 52_300
    # MiMo-V2-Flash (15B active vs 37B) at the same effective FLOP/s: about 2.4x that, less step overhead
    mimo = COST.prefill_tokens_per_s(CALIBRATION_PREFILL_INPUT_LEN)
    assert 90_000 < mimo < 130_000


def test_the_calibration_reproduces_the_published_decode_figure() -> None:
    # "per request decoding throughput remains at 150 TPS" (LMSYS MiMo-V2-Flash post, H200)
    assert COST.decode_seconds(150) == pytest.approx(1.0)  # 150 tokens take one second
    assert COST.decode_seconds(300) == pytest.approx(2.0) and COST.decode_seconds(-3) == 0.0


def test_kv_bytes_are_window_aware() -> None:
    g = mimo_v2_flash()
    assert (g.full_layers, g.swa_layers, g.window) == (9, 39, 128)
    assert g.full_kv_bytes_per_token == 9 * 4 * (192 + 128) * 2
    assert g.swa_kv_bytes_per_token == 39 * 8 * (192 + 128) * 2
    # past the window only the full layers grow
    assert g.kv_bytes(10_128) - g.kv_bytes(128) == 10_000 * g.full_kv_bytes_per_token
    assert g.kv_bytes(100) == 100 * (g.full_kv_bytes_per_token + g.swa_kv_bytes_per_token)
    fast = CostModel(kv_link_bytes_per_s=COST.kv_link_bytes_per_s * 4)
    assert fast.kv_transfer_seconds(16384) < COST.kv_transfer_seconds(16384)


@pytest.mark.parametrize(
    "start, end, window", [(0, 1, 4), (0, 10, 4), (3, 9, 4), (5, 6, 4), (0, 300, 128), (200, 260, 128)]
)
def test_window_context_sum_is_the_brute_force_sum(start: int, end: int, window: int) -> None:
    assert _window_ctx(start, end, window) == sum(min(p + 1, window + 1) for p in range(start, end))


def test_time_scale_divides_every_service_time() -> None:
    scaled = CostModel(time_scale=10)
    for sim in (COST.prefill_seconds(4096), COST.kv_transfer_seconds(4096), COST.decode_seconds(30)):
        assert scaled.real_seconds(sim) == pytest.approx(sim / 10)

    async def wall(clock: SimClock, sim_seconds: float) -> float:
        t = time.monotonic()
        await clock.sleep_until(clock.now() + sim_seconds)
        return time.monotonic() - t

    assert 0.09 <= asyncio.run(wall(SimClock(20.0), 2.0)) < 0.4  # 2 simulated seconds at K=20: 0.1 s


def test_decode_tokens_are_paced_by_tpot_over_the_time_scale() -> None:
    cost = CostModel(
        time_scale=4
    )  # 30 tokens after the first at 150/s: 0.2 simulated s, 0.05 s of wall clock

    async def run() -> tuple[list[int], float]:
        t = time.monotonic()
        ids: list[int] = []
        async for chunk in paced_tokens([1, 2, 3], 31, cost, SimClock(4)):
            ids += chunk.token_ids
        return ids, time.monotonic() - t

    ids, took = asyncio.run(run())
    assert len(ids) == 30
    assert 0.045 <= took < 0.15
