"""The slice of a trace a replay sends, and the scaling factors applied to it."""

from __future__ import annotations

import math

import pytest

from bench.replay.ideal import ideal_hit_rate
from bench.replay.plan import PlannedRequest, Scaling, TraceSlice, plan, select
from bench.replay.traces import Trace, TraceRequest


def _trace() -> Trace:
    reqs = [
        TraceRequest(0.0, 1300, 300, (0, 1, 2)),  # blocks 512 + 512 + 276
        TraceRequest(2.0, 512, 0, (0,)),
        TraceRequest(4.0, 1537, 50, (0, 1, 2, 9)),  # last block: 1 token
        TraceRequest(6.0, 100, 20, (7,)),
        TraceRequest(8.0, 2048, 10, (0, 1, 3, 4)),
    ]
    return Trace("hand-made", "mooncake", tuple(reqs))


@pytest.mark.parametrize(
    ("window", "indices"),
    [
        (TraceSlice(), [0, 1, 2, 3, 4]),
        (TraceSlice(start_s=2.0), [1, 2, 3, 4]),
        (TraceSlice(start_s=2.0, duration_s=4.0), [1, 2]),  # [2, 6): 6.0 is out
        (TraceSlice(start_s=1.0, duration_s=100.0, limit=2), [1, 2]),
        (TraceSlice(limit=1), [0]),
        (TraceSlice(start_s=9.0), []),
    ],
)
def test_slice(window: TraceSlice, indices: list[int]) -> None:
    assert [i for i, _ in select(_trace(), window)] == indices


def test_no_scaling_keeps_the_trace_and_asks_for_at_least_one_token() -> None:
    p = plan(_trace(), TraceSlice(), Scaling())
    assert [r.input_length for r in p] == [1300, 512, 1537, 100, 2048]
    assert [r.output_length for r in p] == [300, 1, 50, 20, 10]
    assert [r.send_at_s for r in p] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert {r.block_size for r in p} == {512}


def test_prompt_scale_shrinks_blocks_and_keeps_their_count() -> None:
    p = plan(_trace(), TraceSlice(), Scaling(prompt_scale=16))
    assert {r.block_size for r in p} == {32}
    # full blocks become 32 tokens; a partial block of p tokens ceil(p / 16)
    assert [r.input_length for r in p] == [32 + 32 + 18, 32, 3 * 32 + 1, 7, 4 * 32]
    for r in p:
        assert len(r.hash_ids) == math.ceil(r.input_length / r.block_size)
    # when F divides 512 that is ceil(input / F)
    assert [r.input_length for r in p] == [math.ceil(n / 16) for n in (1300, 512, 1537, 100, 2048)]


def test_a_prompt_scale_that_does_not_divide_the_block() -> None:
    p = plan(_trace(), TraceSlice(limit=1), Scaling(prompt_scale=3))
    assert p[0].block_size == 171  # round(512 / 3)
    assert p[0].input_length == 2 * 171 + math.ceil(276 * 171 / 512)


def test_the_sharing_structure_survives_prompt_scaling() -> None:
    full = plan(_trace(), TraceSlice(), Scaling())
    small = plan(_trace(), TraceSlice(), Scaling(prompt_scale=32))
    assert ideal_hit_rate(full) == pytest.approx(ideal_hit_rate(small), abs=0.02)


def test_rate_and_time_scale_divide_the_gaps_from_the_slice_start() -> None:
    p = plan(_trace(), TraceSlice(start_s=1.0), Scaling(rate_scale=2.0, time_scale=4.0))
    assert [r.send_at_s for r in p] == [0.0, 0.25, 0.5, 0.75]  # the first request leaves at once
    assert [r.index for r in p] == [1, 2, 3, 4]


def test_max_output_caps() -> None:
    p = plan(_trace(), TraceSlice(), Scaling(max_output=25))
    assert [r.output_length for r in p] == [25, 1, 25, 20, 10]


@pytest.mark.parametrize(
    "make",
    [
        lambda: Scaling(prompt_scale=0),
        lambda: Scaling(rate_scale=-1),
        lambda: Scaling(time_scale=0),
        lambda: Scaling(max_output=-1),
        lambda: TraceSlice(duration_s=0),
        lambda: TraceSlice(limit=0),
        lambda: TraceSlice(start_s=-1),
        lambda: PlannedRequest(0, 0.0, 65, 1, (1, 2), 32),  # 65 tokens need 3 blocks of 32
    ],
)
def test_bad_settings_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_a_prompt_scale_beyond_the_block_is_refused() -> None:
    with pytest.raises(ValueError, match="less than 1 token"):
        plan(_trace(), TraceSlice(), Scaling(prompt_scale=2048))
