"""The deterministic fleet simulation (bench/compare/fleet_des.py) and, on it, two goals of the
router issue that do not depend on the machine: a burst of siblings lands on one worker, and the
router's predicted cached tokens match what the workers report. SIMULATED."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from bench.compare.fleet_des import simulate, variant_config


def burst(n: int, shared: int, suffix: int, seed: int, at: float = 0.0) -> list[tuple[float, list[int]]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(1000, 100_000) for _ in range(shared)]
    return [(at + 1e-4 * i, prefix + [rng.randrange(1000, 100_000) for _ in range(suffix)]) for i in range(n)]


@pytest.mark.parametrize("window", [128, 0])
@pytest.mark.parametrize("shared", [2048, 8192])
def test_a_burst_of_siblings_lands_on_one_worker_under_the_default(window: int, shared: int) -> None:
    arrivals = burst(16, shared, 300, seed=shared + window)
    r = simulate(arrivals, variant_config("", window), workers=8, window=window)
    top = Counter(r.placed.values()).most_common(1)[0][1]
    assert top >= 15, r.placed
    # without pending entries the idle fleet's loads stay equal (the registry's 50 ms gap) and the
    # siblings tie everywhere: the first-page tie-break (routing.anchor_key) alone keeps them together
    without = simulate(arrivals, variant_config("--no-pending", window), workers=8, window=window)
    assert Counter(without.placed.values()).most_common(1)[0][1] >= 15, without.placed


def test_the_simulation_is_deterministic_and_counts_every_request() -> None:
    arrivals = (
        burst(8, 1024, 100, seed=1) + burst(8, 1024, 100, seed=2, at=0.5) + burst(4, 4096, 50, seed=1, at=1.0)
    )
    cfg = variant_config("", 128)
    a, b = simulate(arrivals, cfg, workers=4, window=128), simulate(arrivals, cfg, workers=4, window=128)
    assert a == b and len(a.placed) == len(arrivals) == len(a.cached)
    assert 0 < a.hit < 1 and a.phantom <= 1 and a.p90_ms >= a.p50_ms > 0


def test_one_engine_of_the_fleets_size_holds_what_one_worker_cannot() -> None:
    """`scale`: one worker with N workers' pools. Prompts with 4 distinct 40k-token prefixes, each
    sent twice (cycled): one worker of 1 x 64k tokens evicts every prefix before it comes back, one
    engine of 4 x 64k keeps them all and hits every second visit (as far as the window allows)."""
    rng = random.Random(5)
    prefixes = [[rng.randrange(1000, 100_000) for _ in range(40_000)] for _ in range(4)]
    arrivals = [
        (2.0 * i, p + [rng.randrange(1000, 100_000) for _ in range(64)]) for i, p in enumerate(prefixes * 2)
    ]
    cfg = variant_config("", 0)
    small = simulate(arrivals, cfg, workers=1, window=0, capacity_tokens=1 << 16)
    big = simulate(arrivals, cfg, workers=1, window=0, capacity_tokens=1 << 16, scale=4)
    assert small.hit == 0.0
    assert big.hit == pytest.approx(
        sum(40_000 // 64 * 64 for _ in range(4)) / sum(len(a[1]) for a in arrivals), rel=0.02
    )
