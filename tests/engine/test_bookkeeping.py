"""build_bookkeeping: the pools, cache, host tier and scheduler an engine (and bench/sim) runs on."""

from __future__ import annotations

import math
import random

import pytest

from services.common.kv_events import BlockStored
from services.engine.bookkeeping import BookkeepingConfig, build_bookkeeping
from services.engine.queue_policy import make_queue_policy


@pytest.mark.parametrize("seed", range(5))
def test_sizes_follow_the_config(seed: int) -> None:
    rng = random.Random(seed)
    page, window, running = rng.choice([1, 4, 16]), rng.choice([0, 5, 128]), rng.randrange(1, 9)
    total = page * rng.randrange(1, 200)
    host = rng.choice([0, page * rng.randrange(1, 50)])
    cfg = BookkeepingConfig(page_size=page, window=window, max_total_tokens=total + rng.randrange(page),
                            max_running=running, host_kv_tokens=host)  # fmt: skip
    bk = build_bookkeeping(cfg)
    window_pages = math.ceil(window / page) + 2
    assert (bk.full_pool.num_pages, bk.swa_pool.num_pages) == (total // page, 2 * running * window_pages)
    assert bk.scheduler.cache is bk.cache and bk.scheduler.full_pool is bk.full_pool
    assert bk.cache.full_pool is bk.full_pool and bk.cache.swa_pool is bk.swa_pool
    if host:
        assert bk.host is not None and bk.scheduler.host is bk.host and bk.host_events is not None
        assert bk.host.full_pool.num_pages == bk.host.swa_pool.num_pages == host // page
    else:
        assert bk.host is None and bk.host_events is None and bk.scheduler.host is None


def test_explicit_sizes_policy_and_clock_are_used() -> None:
    now = [7.0]
    cfg = BookkeepingConfig(page_size=4, window=8, max_total_tokens=64, swa_pages=9, queue_policy="uncached-first",
                            host_kv_tokens=32, host_swa_pages=3, enable_prefix_cache=True)  # fmt: skip
    bk = build_bookkeeping(cfg, clock=lambda: now[0])
    assert bk.swa_pool.num_pages == 9 and bk.host is not None and bk.host.swa_pool.num_pages == 3
    assert type(bk.scheduler.policy) is type(make_queue_policy("uncached-first"))
    assert bk.scheduler.clock() == 7.0
    bk.cache.insert(list(range(8)), bk.full_pool.alloc(2), bk.swa_pool.alloc(2))
    assert any(isinstance(e, BlockStored) for e in bk.events.drain())  # the cache's events land here


def test_no_prefix_cache_means_no_host_tier() -> None:
    cfg = BookkeepingConfig(page_size=4, window=8, max_total_tokens=64, host_kv_tokens=32, enable_prefix_cache=False)
    assert build_bookkeeping(cfg).host is None


def test_too_few_swa_pages_and_bad_names_are_errors() -> None:
    with pytest.raises(ValueError, match="swa_pages must be >= 4"):
        build_bookkeeping(BookkeepingConfig(page_size=4, window=8, max_total_tokens=64, swa_pages=3))
    with pytest.raises(ValueError):
        build_bookkeeping(BookkeepingConfig(page_size=4, window=8, max_total_tokens=64, queue_policy="lifo"))
