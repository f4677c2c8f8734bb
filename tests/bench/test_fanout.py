"""bench/fanout.py: burst prompts, and the rounds' core on a small live fleet (real redis-server, sim
prefill and decode workers, three real router processes: two burst replicas and the load router).
Checks that the figures add up and agree with the responses; the goal itself (>= 15 of 16 on one
worker) is not asserted here."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bench import fanout
from bench.fanout import RoundResult, Setup


def test_a_burst_shares_the_prefix_exactly_and_then_differs() -> None:
    setup = Setup(burst=6, suffix=(3, 9))
    prompts = fanout.burst_prompts(setup, 64, np.random.default_rng(7))
    assert len(prompts) == 6
    assert all(p[:64] == prompts[0][:64] for p in prompts)
    assert len({p[64] for p in prompts}) == 6  # no two share more than the prefix
    assert all(64 + 3 <= len(p) <= 64 + 9 for p in prompts)
    assert all(fanout.VOCAB[0] <= t < fanout.VOCAB[1] for p in prompts for t in p)
    again = fanout.burst_prompts(setup, 64, np.random.default_rng(7))
    assert again == prompts  # seeded: every run sends the same bursts


def test_rounds_plan_each_replica_count_idle_and_loaded() -> None:
    rounds = fanout.plan_rounds([512, 1024], replicas=4, repeats=2)
    assert len(rounds) == 2 * 2 * 2 * 2
    assert {(r.replicas, r.loaded) for r in rounds} == {(1, False), (1, True), (4, False), (4, True)}
    assert len(fanout.plan_rounds([512], replicas=1, repeats=1)) == 2  # one replica: no second set


def _result(**kw: object) -> RoundResult:
    base: dict[str, object] = dict(
        window=0, prefix=4096, replicas=1, loaded=False, repeat=0, sent=16, ok=16,
        per_worker={"a": 15, "b": 1}, busy_workers=0, send_spread_ms=3.0, prompt_tokens=70_000,
        cached_tokens=61_440, ideal_cached_tokens=61_440, predicted_tokens=61_440,
        reported_tokens=61_440, phantom_hits=0, errors=[],
    )  # fmt: skip
    return RoundResult(**{**base, **kw})  # type: ignore[arg-type]


def test_table_and_summary() -> None:
    rows = [_result(), _result(replicas=4, loaded=True, busy_workers=3, per_worker={"a": 9, "b": 7})]
    lines = fanout.table(rows).splitlines()
    assert len(lines) == 4 and len({ln.count("|") for ln in lines}) == 1
    assert lines[2].startswith("| 0 | 1 | idle | 4,096 | 16/16 | 3.0 | 15 | 2 |")
    assert "| loaded (3 busy) |" in lines[3] and "| 9 | 2 |" in lines[3]
    assert fanout.summary(rows) == [
        "- 1 replica(s): on the top worker 94% of a burst on average; 1/1 rounds meet >= 15 of 16",
        "- 4 replica(s): on the top worker 56% of a burst on average; 0/1 rounds meet >= 15 of 16",
    ]


@pytest.mark.parametrize(
    "argv",
    [["--suffix", "9:3"], ["--prefixes", "1,x"], ["--windows", ""], ["--burst", "1"], ["--suffix", "0:4"]],
)
def test_bad_flags_exit_with_a_message(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        fanout.main(argv)
    assert isinstance(e.value.code, str) and e.value.code.startswith("fanout: ")


def test_rounds_on_a_live_fleet_add_up(tmp_path: Path) -> None:
    from services.models.model_store import resolve_model

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server")
    resolve_model("mimo-tiny")  # our router reads its tokenizer from it
    # time scale 0.25: the background request (8k tokens) keeps a worker busy ~0.3 s of wall time
    setup = Setup(workers=3, replicas=2, burst=4, suffix=(20, 40), load_tokens=8192, time_scale=0.25)
    rounds = fanout.plan_rounds([256], setup.replicas, 1)
    results = fanout.run_window(setup, 0, rounds, tmp_path)
    assert [(r.replicas, r.loaded) for r in results] == [(1, False), (1, True), (2, False), (2, True)]
    for r in results:
        assert r.errors == [] and r.sent == r.ok == 4, r
        assert sum(r.per_worker.values()) == 4  # every request of the burst, and none of the background
        assert r.top == max(r.per_worker.values())
        if r.replicas == 1:  # one router: its own pending entries steer the burst onto one worker
            assert r.top == 4 and len(r.per_worker) == 1, r
        assert r.ideal_cached_tokens == 256 * 3
        assert 4 * (256 + 20) <= r.prompt_tokens <= 4 * (256 + 40)
        assert 0 <= r.cached_tokens <= r.ideal_cached_tokens
        # the router's count of reported cached tokens is what the responses' usage said
        assert r.reported_tokens == r.cached_tokens
    assert all(r.busy_workers >= 1 for r in results if r.loaded)  # the burst left behind the load
    text = fanout.table(results)
    assert len(text.splitlines()) == 2 + len(results)
