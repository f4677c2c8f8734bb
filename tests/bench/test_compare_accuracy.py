"""bench/compare/accuracy.py: the router's prediction metrics as the comparison reads them, from the
text the router's own RouterMetrics renders, summed over replicas, and into the table and goals."""

from __future__ import annotations

import pytest

from bench.compare import accuracy
from services.router.metrics import RouterMetrics
from services.router.policy import Candidate
from services.router.routing import RoutingDecision


def _decision(predicted: int, prompt: int, worker: str = "p0") -> RoutingDecision:
    cand = Candidate(worker_id=worker, addr=worker)
    return RoutingDecision(
        prefill=cand,
        decode=Candidate(worker_id="d0", addr="d0", role="decode"),
        uncached_tokens=prompt - predicted,
        raw_match_tokens=predicted,
        safe_match_tokens=predicted,
        reason="cache_hit" if predicted else "cache_miss",
        prompt_tokens=prompt,
    )


def _rendered(cases: list[tuple[int, int, int]], worker: str = "p0") -> str:
    """/metrics of a router that saw (predicted, reported, prompt) per request."""
    m = RouterMetrics()
    for predicted, reported, prompt in cases:
        m.observe_prediction(_decision(predicted, prompt, worker), reported)
    return m.render().decode()


def test_figures_from_two_replicas_scrapes() -> None:
    # replica A: an exact hit, a phantom (1000 predicted, 0 reported); replica B: a missed hit, a miss
    a = _rendered([(1000, 1000, 2000), (1000, 0, 1000)], worker="p0")
    b = _rendered([(0, 500, 1000), (0, 0, 1000)], worker="p1")
    f = accuracy.figures(accuracy.combine([accuracy.parse(a), accuracy.parse(b)]))
    assert f["requests"] == 4 and f["prompt_tokens"] == 5000
    assert (f["predicted_tokens"], f["reported_tokens"], f["abs_error_tokens"]) == (2000, 1500, 1500)
    assert (f["phantom_hits"], f["missed_hits"]) == (1, 1)
    assert f["error_share"] == pytest.approx(1500 / 5000)
    assert f["bias_share"] == pytest.approx(500 / 5000)
    assert f["mean_request_error_share"] == pytest.approx((0 + 1 + 0.5 + 0) / 4)
    assert f["phantom_share"] == f["missed_share"] == 0.25
    assert accuracy.per_worker(a + b) == {"p0": 2.0, "p1": 2.0}


def test_a_router_that_counted_nothing_has_no_shares() -> None:
    f = accuracy.figures(accuracy.parse(RouterMetrics().render().decode()))
    assert f["requests"] == 0 and f["error_share"] is None and f["phantom_share"] is None


def test_the_difference_of_two_scrapes_is_what_happened_between_them() -> None:
    m = RouterMetrics()
    m.observe_prediction(_decision(64, 100), 64)
    before = accuracy.parse(m.render().decode())
    m.observe_prediction(_decision(64, 100), 0)
    f = accuracy.figures(accuracy.minus(accuracy.parse(m.render().decode()), before))
    assert f["requests"] == 1 and f["phantom_hits"] == 1 and f["error_share"] == pytest.approx(0.64)


def test_table_gets_the_two_columns_and_text_routers_show_n_a() -> None:
    table = "| policy | hit rate |\n|---|---|\n| swaserve-seed | 50% |\n| round-robin | 20% |"
    ours = {"accuracy": accuracy.figures(accuracy.parse(_rendered([(96, 90, 1000), (32, 0, 1000)])))}
    out = accuracy.with_columns(table, [ours, {"accuracy": None}]).splitlines()
    assert out[0] == "| policy | hit rate | pred. error / prompt | phantom hits |"
    assert out[1] == "|---|---|---|---|"
    assert out[2] == "| swaserve-seed | 50% | 1.90% | 50.00% |"  # (6 + 32) / 2000; 1 of 2
    assert out[3] == "| round-robin | 20% | n/a | n/a |"
    with pytest.raises(ValueError, match="1 rows for 2 runs"):
        accuracy.with_columns("| a |\n|---|\n| x |", [ours, ours])


@pytest.mark.parametrize(
    ("cases", "met"),
    [
        ([(100, 100, 1000)] * 300, [True, True]),  # exact
        ([(100, 100, 1000)] * 299 + [(100, 0, 1000)], [True, True]),  # 1 phantom in 300: 0.33%
        ([(100, 100, 1000)] * 198 + [(100, 0, 1000)] * 2, [True, False]),  # 1%: too many phantoms
        ([(100, 70, 1000)] * 10, [False, True]),  # |error| 3% of the prompt
    ],
)
def test_goals_error_at_most_2_percent_and_phantoms_below_half_a_percent(
    cases: list[tuple[int, int, int]], met: list[bool]
) -> None:
    s = {"policy": "swaserve-seed", "accuracy": accuracy.figures(accuracy.parse(_rendered(cases)))}
    goals = accuracy.goals([{"policy": "round-robin", "accuracy": None}, s], "conv 8", "swaserve-seed")
    assert [g.met for g in goals] == met
    assert accuracy.goals([{"policy": "round-robin", "accuracy": None}], "conv 8", "swaserve-seed") == []
