"""The host tier's KV events (tier "l2") through Redis to a router-side follower: the follower's
one-page-window index says exactly where a worker can restore a prompt to, and forgets what L2
evicted. Real redis-server, a real engine loop (tiny random MiMo), the real publisher/follower."""

from __future__ import annotations

import random

import pytest

from services.common.block_hash import hash_blocks
from services.common.kv_event_bus import KVIndexFollower
from services.common.redis_server import RedisServer
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.worker.engine_loop import EngineLoop
from services.worker.serve import L2_TIER, attach_l2_events
from tests.engine.tiny_models import mimo_dict, random_model
from tests.waiting import wait_for as _wait

PAGE = 4
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


@pytest.fixture
def redis_server():
    with RedisServer() as srv:
        yield srv


def test_the_followers_l2_index_matches_what_the_host_tier_can_restore(redis_server):
    model = random_model(mimo_dict(window=8), seed=2)
    cfg = EngineConfig(page_size=PAGE, max_total_tokens=256, host_kv_tokens=96, host_swa_pages=8)
    loop = EngineLoop(Engine(model, model.config, cfg), threads=1, name="l2-events").start()
    publisher = attach_l2_events(loop, redis_server.url, "w1")
    follower = KVIndexFollower(redis_server.url, PAGE, PAGE, tier=L2_TIER, block_ms=100).start()
    rng = random.Random(1)
    try:
        assert publisher is not None
        a = [rng.randrange(250) for _ in range(41)]
        loop.add_request(a, ONE, rid="a").wait_finished(30)
        hashes = hash_blocks(a, PAGE)  # 10 full pages; the prompt's end (page 10) got a tail
        assert _wait(lambda: follower.index.match(hashes).get("w1") is not None)
        m = follower.index.match(hashes)["w1"]
        host = loop.engine.host
        assert host is not None and (m.raw_blocks, m.safe_blocks) == (10, 10)
        assert host.lookup(hashes, 0) is not None and host.lookup(hashes, 0).end == 10  # type: ignore[union-attr]
        # more traffic than the 24 host pages hold: a's blocks leave L2, and the index follows
        for i in range(3):
            loop.add_request([rng.randrange(250) for _ in range(41)], ONE, rid=f"b{i}").wait_finished(30)
        assert host.lookup(hashes, 0) is None
        assert _wait(lambda: follower.index.match(hashes).get("w1", None) is None
                     or follower.index.match(hashes)["w1"].safe_blocks == 0)  # fmt: skip
    finally:
        follower.close()
        publisher.close()
        loop.stop()
