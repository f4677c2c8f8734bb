"""The infinite-cache hit rate on hand-made traces, worked out by hand."""

from __future__ import annotations

from fractions import Fraction

import pytest

from bench.replay.ideal import ideal_hit_rate, ideal_hit_tokens
from bench.replay.plan import PlannedRequest

BLOCK = 4


def _req(ids: list[int], length: int) -> PlannedRequest:
    return PlannedRequest(0, 0.0, length, 1, tuple(ids), BLOCK)


def test_a_hand_worked_trace() -> None:
    trace = [
        _req([1, 2, 3], 10),  # nothing seen yet                        -> 0
        _req([1, 2, 4], 12),  # 1, 2 seen; 4 new                        -> 2 blocks = 8
        _req([1, 2, 3], 10),  # the first prompt again, partial block    -> min(3 * 4, 10) = 10
        _req([5, 2], 8),  # 5 new: 2 was seen, but not as a prefix here  -> 0
        _req([1, 2, 4, 7], 15),  # 1, 2, 4 seen                          -> 12
    ]
    assert ideal_hit_tokens(trace) == [0, 8, 10, 0, 12]
    assert ideal_hit_rate(trace) == pytest.approx(float(Fraction(0 + 8 + 10 + 0 + 12, 10 + 12 + 10 + 8 + 15)))


def test_order_matters() -> None:
    long, short = _req([1, 2], 8), _req([1], 3)
    assert ideal_hit_tokens([long, short]) == [0, 3]  # the short prompt is inside the long one
    assert ideal_hit_tokens([short, long]) == [0, 4]  # the shared block counts whole
    assert ideal_hit_rate([long, short]) == pytest.approx(3 / 11)
    assert ideal_hit_rate([short, long]) == pytest.approx(4 / 11)


def test_unique_blocks_give_zero_and_no_requests_give_zero() -> None:
    assert ideal_hit_rate([_req([1, 2], 8), _req([3], 4), _req([4, 5, 6], 9)]) == 0.0
    assert ideal_hit_rate([]) == 0.0


def test_a_repeated_prompt_hits_everything_but_nothing_more() -> None:
    r = _req([7, 8], 6)
    assert ideal_hit_tokens([r, r, r]) == [0, 6, 6]
    assert ideal_hit_rate([r, r, r]) == pytest.approx(12 / 18)
