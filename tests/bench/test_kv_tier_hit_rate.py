"""bench/kv_tier_hit_rate.py's bookkeeping of the engine's L3 flow, on hand-made conversations."""

from __future__ import annotations

import random

from bench.kv_tier_hit_rate import PAGE, WINDOW, AllSwaHostTier, serve
from services.engine.kv.host_tier import HostTier


def _conversation(rng: random.Random, turns: int, first: int, more: int) -> list[list[int]]:
    prompt = [rng.randrange(1000) for _ in range(first)]
    out = [list(prompt)]
    for _ in range(turns - 1):
        prompt += [rng.randrange(1000) for _ in range(more)]
        out.append(list(prompt))
    return out


def test_a_turn_on_another_worker_hits_what_the_first_worker_wrote_down_to_l3():
    rng = random.Random(0)
    a, b = _conversation(rng, 2, 300, 90)  # turn 1 on worker 0, turn 2 on worker 1 (round-robin)
    hosts = [HostTier(512, 512, PAGE, WINDOW) for _ in range(2)]
    cached, l2, l3 = serve([a, b], 1024, list(hosts), HostTier(4096, 4096, PAGE, WINDOW))
    # turn 1 cached its prompt end (page-aligned) with its SWA tail: exactly that comes back
    assert cached == l3 == len(a) // PAGE * PAGE
    assert l2 == 0
    cached, _, l3 = serve([a, b], 1024, [HostTier(512, 512, PAGE, WINDOW) for _ in range(2)])
    assert cached == l3 == 0  # without L3 the other worker has nothing


def test_an_all_swa_l3_hits_the_same_turn_at_any_page_end():
    rng = random.Random(1)
    a, b = _conversation(rng, 2, 301, 64)
    hosts = [AllSwaHostTier(256) for _ in range(2)]
    cached, _, l3 = serve([a, b], 1024, list(hosts), AllSwaHostTier(2048))
    assert cached == l3 > 0 and cached % PAGE == 0
