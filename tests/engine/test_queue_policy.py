import pytest

from services.common.sampling_params import SamplingParams
from services.engine.queue_policy import make_queue_policy
from services.engine.request import Req


def _req(rid, n, arrival):
    return Req(rid=rid, prompt_ids=[1] * n, params=SamplingParams(), arrival=arrival)


def test_fcfs_orders_by_arrival():
    reqs = [_req("b", 10, 2.0), _req("a", 500, 1.0), _req("c", 1, 3.0)]
    order = make_queue_policy("fcfs").order(reqs, now=3.0, uncached=lambda r: r.seq_len)
    assert [r.rid for r in order] == ["a", "b", "c"]


def test_uncached_first_prefers_few_uncached_tokens():
    reqs = [_req("long", 1000, 0.0), _req("short", 10, 0.0), _req("cached", 1000, 0.0)]
    uncached = {"long": 1000, "short": 10, "cached": 3}
    order = make_queue_policy("uncached-first").order(reqs, now=0.0, uncached=lambda r: uncached[r.rid])
    assert [r.rid for r in order] == ["cached", "short", "long"]


def test_uncached_first_does_not_starve_long_requests():
    policy = make_queue_policy("uncached-first", aging_tokens_per_s=100.0)
    long = _req("long", 1000, 0.0)
    # a stream of short requests keeps arriving; the long one must win once it waited ~10 s
    winners = []
    for t in range(0, 20):
        short = _req(f"s{t}", 10, float(t))
        first = policy.order([long, short], now=float(t), uncached=lambda r: r.seq_len)[0]
        winners.append(first.rid)
    assert winners[0] == "s0"
    assert "long" in winners
    assert winners.index("long") <= 10


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError, match="fcfs"):
        make_queue_policy("lifo")


def test_aging_must_be_positive():
    with pytest.raises(ValueError, match="starve"):
        make_queue_policy("uncached-first", aging_tokens_per_s=0)
