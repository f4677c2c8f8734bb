"""The infinite-cache hit rate: hand-made traces worked out by hand, and random traces against the
token-exact longest common prefix of the built prompts."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

from bench.replay.ideal import ideal_hit_rate, ideal_hit_tokens
from bench.replay.plan import PlannedRequest
from bench.replay.prompts import Continuations, PromptBuilder, VocabRange
from tests.bench.test_replay_prompts import _conversation_trace

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
    assert ideal_hit_tokens([short, long]) == [0, 3]  # only 3 tokens of block 1 were ever sent
    assert ideal_hit_rate([long, short]) == pytest.approx(3 / 11)
    assert ideal_hit_rate([short, long]) == pytest.approx(3 / 11)


def test_a_partial_block_counts_as_far_as_the_longest_earlier_take() -> None:
    trace = [_req([1, 2], 5), _req([1, 2], 7), _req([1, 2, 3], 10), _req([1, 2], 6)]
    assert ideal_hit_tokens(trace) == [0, 5, 7, 6]


def test_unique_blocks_give_zero_and_no_requests_give_zero() -> None:
    assert ideal_hit_rate([_req([1, 2], 8), _req([3], 4), _req([4, 5, 6], 9)]) == 0.0
    assert ideal_hit_rate([]) == 0.0


def test_a_repeated_prompt_hits_everything_but_nothing_more() -> None:
    r = _req([7, 8], 6)
    assert ideal_hit_tokens([r, r, r]) == [0, 6, 6]
    assert ideal_hit_rate([r, r, r]) == pytest.approx(12 / 18)


def test_a_continuation_counts_the_earlier_prompt_whole() -> None:
    trace = [_req([1, 2, 3], 9), _req([1, 2, 4, 5], 14), _req([1, 2, 4], 12)]
    cont = Continuations.plan(trace)
    assert cont.continued == (0, 9, 0)
    assert ideal_hit_tokens(trace) == [0, 8, 12]  # ids only: blocks 1, 2; then 4 seen whole
    assert ideal_hit_tokens(trace, cont.continued) == [0, 9, 12]  # 8 + 1 token of 3; 4 seen whole


def _lcp(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@pytest.mark.parametrize(("seed", "mode"), [(0, "continue"), (1, "continue"), (2, "continue"), (3, "blocks")])
def test_random_traces_equal_the_longest_prefix_shared_with_any_earlier_prompt(seed: int, mode: str) -> None:
    reqs = _conversation_trace(random.Random(seed), 8, 120)
    cont = Continuations.plan(reqs) if mode == "continue" else Continuations()
    b = PromptBuilder(VocabRange(0, 10**9), seed=seed, continuations=cont)  # no equal tokens by chance
    prompts = [np.array(b.token_ids(r)) for r in reqs]
    reference = [max((_lcp(p, q) for q in prompts[:k]), default=0) for k, p in enumerate(prompts)]
    assert ideal_hit_tokens(reqs, cont.continued or None) == reference
    if mode == "continue":
        assert sum(reference) > sum(ideal_hit_tokens(reqs))  # continuations add reuse here
