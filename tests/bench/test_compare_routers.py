"""bench/compare_routers.py: the pure pieces on hand-made data (long/short split, goals, capacity bound,
table, run planning), and one short live run of the harness on a hand-made 20-request trace."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from bench.compare import analysis
from bench.compare.analysis import Goal, SplitP90
from bench.compare.fleet import POLICIES, FleetSpec, _sim_flags, session_cpu_seconds
from bench.compare.run import RunSpec, Workload, backlog_figures
from bench.compare_routers import _better, _stale, main, time_scale
from bench.replay.ideal import ideal_hit_rate
from bench.replay.plan import PlannedRequest
from bench.replay.prompts import Continuations


def _row(length: int, ttft: float, ok: bool = True) -> dict[str, object]:
    return {"input_length": length, "ttft_ms": ttft, "ok": ok}


def test_split_at_the_median_length_gives_each_side_its_own_p90() -> None:
    # lengths 100..1000; the slow one of length 1000 failed and counts for the median only
    rows = [_row(100 * i, float(i)) for i in range(1, 10)] + [_row(1000, 1e6, ok=False)]
    threshold = analysis.median_length(rows)
    assert threshold == 550.0
    split = analysis.split_p90(rows, threshold)
    assert (split.long_count, split.short_count) == (4, 5)  # 600..900 ok; 100..500
    assert split.short_p90_ms == pytest.approx(4.6)  # of 1..5: rank 3.6
    assert split.long_p90_ms == pytest.approx(8.7)  # of 6..9: rank 2.7


def _crow(index: int, length: int, cached: int, ttft: float, ok: bool = True) -> dict[str, object]:
    return {"index": index, "input_length": length, "cached_tokens": cached, "ttft_ms": ttft, "ok": ok}


def test_split_by_uncached_tokens_puts_a_mostly_cached_long_prompt_with_the_short_ones() -> None:
    # uncached = input - cached: 100, 200, 300, 4000 (long but 9000 cached), 5000, 6000; a failed one
    rows = [_crow(0, 100, 0, 1.0), _crow(1, 200, 0, 2.0), _crow(2, 300, 0, 3.0), _crow(3, 13000, 9000, 4.0),
            _crow(4, 5000, 0, 5.0), _crow(5, 6000, 0, 6.0), _crow(6, 9000, 0, 1e6, ok=False)]  # fmt: skip
    assert analysis.uncached_tokens(rows[3]) == 4000
    assert analysis.median_length(rows) == 5000.0  # by input length: failed requests count
    threshold = analysis.median_length(rows, "uncached")  # successful requests only: 100..6000
    assert threshold == 2150.0
    by_input = analysis.split_p90(rows, 5000.0)
    by_uncached = analysis.split_p90(rows, threshold, "uncached")
    # request 3 (13000 tokens, 4000 to compute) is long by input but cheap: the splits disagree on it
    assert (by_input.long_count, by_input.short_count, by_input.by) == (2, 4, "input")  # 13000, 6000
    assert (by_uncached.long_count, by_uncached.short_count, by_uncached.by) == (3, 3, "uncached")
    assert by_input.long_p90_ms == pytest.approx(5.8)  # of 4, 6
    assert by_input.short_p90_ms == pytest.approx(4.4)  # of 1, 2, 3, 5
    assert by_uncached.long_p90_ms == pytest.approx(5.8)  # of 4, 5, 6
    assert by_uncached.short_p90_ms == pytest.approx(2.8)  # of 1, 2, 3
    # a request without a cache figure (failed, or a server that reports none) counts as all uncached
    assert analysis.uncached_tokens({"input_length": 7, "cached_tokens": None}) == 7


def test_queue_split_reports_both_splits_at_the_fcfs_runs_medians(tmp_path: Path) -> None:
    from bench.compare.report import queue_split

    w = Workload(Path("x/conversation_trace.jsonl"), 0, 60, 16, 1)
    runs = [RunSpec(POLICIES["swaserve-seed"], w, FleetSpec(8, 1, queue_policy=q)) for q in (None, "fcfs")]
    fcfs_rows = [_crow(i, 1000 * (i + 1), 0, 10.0 * (i + 1)) for i in range(4)]  # uncached 1000..4000
    uf_rows = [_crow(i, 1000 * (i + 1), 500 * i, 5.0 * (i + 1)) for i in range(4)]  # uncached 1000..2500
    results: dict[str, object] = {"runs": {}}
    for run, rows in zip(runs, (uf_rows, fcfs_rows), strict=True):
        path = tmp_path / f"{run.key}.json"
        path.write_text(json.dumps({"requests": rows}))
        results["runs"][run.key] = {"replay_json": str(path)}  # type: ignore[index]
    q = queue_split(results, runs)
    assert q is not None
    by = {sp["by"]: sp for sp in q["splits"]}
    assert set(by) == {"input", "uncached"}
    assert by["input"]["threshold"] == by["uncached"]["threshold"] == 2500.0  # the fcfs run's medians
    assert by["input"]["uncached-first"]["long_count"] == 2
    assert by["uncached"]["uncached-first"]["long_count"] == 0  # its hits kept every request <= 2500
    assert by["uncached"]["fcfs"]["long_count"] == 2
    # long by input (> 2500) and short by uncached (<= 2500): uncached-first's 3000 (1000 to compute)
    # and 4000 (2500); none in fcfs, where nothing was cached
    assert q["long_cheap"]["uncached-first"] == {"p90_ms": pytest.approx(19.5), "count": 2}
    assert q["long_cheap"]["fcfs"]["count"] == 0
    results["runs"][runs[1].key] = {"error": "boom"}  # type: ignore[index]
    assert queue_split(results, runs) is None


@pytest.mark.parametrize(
    ("value", "target", "higher", "met", "margin"),
    [(95.0, 90.0, True, True, 5.0), (85.0, 90.0, True, False, -5.0), (-3.0, 0.0, False, True, 3.0),
     (4.0, 0.0, False, False, -4.0)],
)  # fmt: skip
def test_goal_verdict_and_margin(value: float, target: float, higher: bool, met: bool, margin: float) -> None:
    g = Goal("g", "scope", value, target, higher, "%")
    assert g.met is met and g.margin == pytest.approx(margin)
    assert g.line().startswith("- MET" if met else "- MISSED")


def _summary(policy: str, workers: int = 8, **kw: object) -> dict[str, object]:
    base = {"policy": policy, "workers": workers, "completed": 100, "hit_rate": 0.2, "hit_ratio": 0.5,
            "p90_ttft_ms": 1000.0}  # fmt: skip
    return base | kw


def test_group_goals_against_round_robin_and_sglang() -> None:
    runs = [
        _summary("round-robin", hit_rate=0.20),
        _summary("swaserve-seed", hit_rate=0.30, hit_ratio=0.95, p90_ttft_ms=800.0),
        _summary("sglang-cache-aware", p90_ttft_ms=1000.0),
    ]
    goals = {g.name: g for g in analysis.group_goals(runs, "conv 8")}
    assert goals["swaserve-seed hit rate / ideal"].value == pytest.approx(95.0)
    assert goals["swaserve-seed hit rate / ideal"].met
    assert goals["swaserve-seed hit rate over round-robin"].value == pytest.approx(50.0)
    cut = goals["swaserve-seed P90 TTFT below sglang cache_aware"]
    assert cut.value == pytest.approx(20.0) and not cut.met and cut.margin == pytest.approx(-10.0)
    # hit-rate goals are for 8 workers only; the TTFT goal holds at every size
    names = [
        g.name
        for g in analysis.group_goals([_summary("swaserve-seed", 32), _summary("sglang-cache-aware", 32)], "")
    ]
    assert names == ["swaserve-seed P90 TTFT below sglang cache_aware"]


def test_queue_goals_need_a_long_cut_and_no_short_rise() -> None:
    fcfs = SplitP90(500, long_p90_ms=1000.0, short_p90_ms=200.0, long_count=5, short_count=5)
    good = SplitP90(500, long_p90_ms=600.0, short_p90_ms=190.0, long_count=5, short_count=5)
    bad = SplitP90(500, long_p90_ms=900.0, short_p90_ms=250.0, long_count=5, short_count=5)
    assert [g.met for g in analysis.queue_goals(good, fcfs, "")] == [True, True]
    cut, rise = analysis.queue_goals(bad, fcfs, "")
    assert not cut.met and cut.value == pytest.approx(10.0)
    assert not rise.met and rise.value == pytest.approx(25.0)


def _req(i: int, ids: tuple[int, ...], length: int, block: int = 4) -> PlannedRequest:
    return PlannedRequest(index=i, send_at_s=float(i), input_length=length, output_length=1, hash_ids=ids,
                          block_size=block)  # fmt: skip


def test_lru_bound_loses_evicted_prefixes_and_equals_the_ideal_when_nothing_is_evicted() -> None:
    reqs = [_req(0, (1, 2), 8), _req(1, (3, 4), 8), _req(2, (1, 2, 5), 10), _req(3, (3, 4), 8)]
    assert analysis.lru_bound(reqs, 1 << 30) == pytest.approx(ideal_hit_rate(reqs)) == pytest.approx(16 / 34)
    # room for 4 blocks: request 2 still finds 1, 2 (8 hit tokens), then its block 5 evicts 3 and request 3
    # misses; room for 2 blocks: every prefix is gone before it comes back
    assert analysis.lru_bound(reqs, 16) == pytest.approx(8 / 34)
    assert analysis.lru_bound(reqs, 8) == pytest.approx(0.0)


def test_lru_bound_counts_a_continued_prompt_while_its_blocks_are_cached() -> None:
    # request 3 continues request 0 (2 full blocks + 2 tokens of id 3); 1 and 2 touch other blocks
    reqs = [_req(0, (1, 2, 3), 10), _req(1, (1, 2), 8), _req(2, (7,), 4), _req(3, (1, 2, 4, 5), 14)]
    cont = Continuations.plan(reqs)
    assert cont.continued == (0, 0, 0, 10)
    assert analysis.lru_bound(reqs, 1 << 30, cont) == pytest.approx(ideal_hit_rate(reqs, cont.continued))
    assert analysis.lru_bound(reqs, 1 << 30, cont) == pytest.approx((8 + 10) / 36)
    # room for 3 blocks: request 2's block evicts id 3 (request 1 refreshed 1 and 2): the full blocks only
    assert analysis.lru_bound(reqs, 12, cont) == pytest.approx((8 + 8) / 36)
    # room for 2 blocks: every prefix is gone before it comes back
    assert analysis.lru_bound(reqs, 8, cont) == pytest.approx(0.0)


def test_lru_bound_checks_a_third_turn_against_the_block_it_continues_not_an_earlier_one() -> None:
    # turn 2 continues turn 1 (id 4 inherits 2 tokens of id 3), turn 3 continues turn 2 (id 6 inherits
    # 3 tokens of id 5); turn 3 also holds id 4, an earlier turn's inherited block
    reqs = [_req(0, (1, 2, 3), 10), _req(1, (1, 2, 4, 5), 15), _req(2, (1, 2, 4, 6, 7), 19)]
    cont = Continuations.plan(reqs)
    assert cont.continued == (0, 10, 15)
    assert analysis.lru_bound(reqs, 1 << 30, cont) == pytest.approx(ideal_hit_rate(reqs, cont.continued))
    assert analysis.lru_bound(reqs, 1 << 30, cont) == pytest.approx((10 + 15) / 44)
    # room for 4 blocks: turn 2 evicts id 3, but id 5 (what turn 3 continues) is cached: turn 3 whole
    assert analysis.lru_bound(reqs, 16, cont) == pytest.approx((10 + 15) / 44)
    # room for 3 blocks: turn 2 evicts ids 3 and 1: turn 3 shares nothing from its start
    assert analysis.lru_bound(reqs, 12, cont) == pytest.approx(10 / 44)


def test_missed_hits_split_into_prefixes_in_flight_and_prefixes_already_cached() -> None:
    def row(i: int, length: int, start: float, ideal: int, cached: int) -> dict[str, object]:
        return {"index": i, "ok": True, "input_length": length, "started_s": start, "ttft_ms": 100.0,
                "ideal_hit_tokens": ideal, "cached_tokens": cached}  # fmt: skip

    blocks = {0: (1, 2), 1: (1, 2, 3), 2: (1, 2, 4)}
    rows = [row(0, 1024, 0.0, 0, 0), row(1, 1500, 0.05, 1024, 0), row(2, 1500, 1.0, 1024, 512)]
    # request 1 left before request 0's prefill ended (0.1 s): in flight; request 2 came later and got half
    loss = analysis.hit_loss(rows, blocks, 512)
    assert loss == {"in_flight": pytest.approx(1024 / 4024), "available": pytest.approx(512 / 4024)}
    # request 2's new block 4 continues request 0's last block 2: ready when request 0's prefill ended
    rows[2]["ideal_hit_tokens"] = 1100
    loss = analysis.hit_loss(rows, blocks, 512, {4: (2, 76)})
    assert loss["available"] == pytest.approx((1100 - 512) / 4024)
    assert analysis.hit_loss(rows, blocks, 512)["available"] == 0.0  # without it: id 4 never ready


def _full_summary(policy: str, **kw: object) -> dict[str, object]:
    s = {"policy": policy, "workload": {"time_scale": 1.5}, "hit_rate": 0.1234, "hit_ratio": 0.9, "mean_ttft_ms": 321.4,
         "p90_ttft_ms": 654.0, "p99_ttft_ms": 1234.0, "request_throughput": 20.5, "input_throughput": 250000.0,
         "router_cpu_ms_per_req": 7.25, "router_core_util": 0.17, "fleet_cpu_ms_per_req": 13.0,
         "fleet_core_util": 0.36, "failed": 1, "sent": 260, "backlog_imbalance": 2.345,
         "other_cpu_cores": 0.071}  # fmt: skip
    return s | kw


def test_table_has_one_row_per_run_with_the_header_width() -> None:
    sglang = _full_summary("sglang-cache-aware", router_cpu_ms_per_req=2.9, completed=259)
    text = analysis.format_table(
        [_full_summary("swaserve-seed"), {"policy": "vllm-cache-aware", "error": "boom"}, sglang]
    )
    lines = text.splitlines()
    assert len(lines) == 5
    widths = {line.count("|") for line in lines}
    assert widths == {16}  # 15 columns
    assert lines[2] == (
        "| swaserve-seed | 1.5 | 12.3% | 90.0% | 321 | 654 | 1,234 | 20.50 | 250,000 | 2.35 | 7.2 (17%) | 2.50 "
        "| 13.0 (36%) | 0.07 | 1/260 |"
    )
    assert "run failed: boom" in lines[3]
    assert "| 2.9 (17%) | 1.00 |" in lines[4]
    # no sglang-router run in the table: no ratio
    assert "| 7.2 (17%) | n/a |" in analysis.format_table([_full_summary("swaserve-seed")])


def test_router_cpu_goal_is_at_most_twice_sglang_routers() -> None:
    runs = [
        _summary("swaserve-seed", router_cpu_ms_per_req=7.0),
        _summary("sglang-cache-aware", router_cpu_ms_per_req=3.0),
    ]
    goal = next(g for g in analysis.group_goals(runs, "agentic 8") if "router CPU" in g.name)
    assert goal.value == pytest.approx(7 / 3) and not goal.met and goal.margin == pytest.approx(2 - 7 / 3)
    runs[0]["router_cpu_ms_per_req"] = 5.5
    assert next(g for g in analysis.group_goals(runs, "") if "router CPU" in g.name).met


def test_replica_goal_allows_one_point_below_one_replica() -> None:
    one = _summary("swaserve-seed", hit_rate=0.300, router_replicas=1)
    four = _summary("swaserve-seed", hit_rate=0.291, router_replicas=4)
    worse = _summary("least-load", hit_rate=0.10, router_replicas=4)
    goals = analysis.replica_goals(
        [one, four, _summary("least-load", hit_rate=0.2, router_replicas=1), worse], "r"
    )
    assert [g.name for g in goals] == ["swaserve-seed hit rate, 4 router replicas vs 1",
                                       "least-load hit rate, 4 router replicas vs 1"]  # fmt: skip
    assert goals[0].value == pytest.approx(-0.9) and goals[0].met
    assert goals[1].value == pytest.approx(-10.0) and not goals[1].met
    assert analysis.replica_goals([one], "r") == []  # nothing to compare with


def test_time_scale_keeps_the_wall_rate_and_slows_vllm_with_many_workers() -> None:
    a = argparse.Namespace(time_scale=None, wall_rate=32.0, max_time_scale=4.0)
    assert time_scale(a, "swaserve-seed", 8, 16.0) == 2.0
    assert time_scale(a, "swaserve-seed", 8, 2.0) == 4.0  # capped
    assert time_scale(a, "vllm-cache-aware", 8, 16.0) == 1.0  # renders on every worker: 4 / 8 of the rate
    assert time_scale(a, "vllm-cache-aware", 32, 16.0) == 0.25
    assert time_scale(argparse.Namespace(time_scale=3.0), "vllm-cache-aware", 32, 16.0) == 3.0


def test_backlog_imbalance_is_busiest_over_mean_on_busy_samples() -> None:
    f = backlog_figures([[0, 0], [10, 0], [5, 5], [0, 0, 9]])
    assert f["backlog_busy_samples"] == 3
    assert f["backlog_imbalance"] == pytest.approx((10 + 5 + 9) / (5 + 5 + 3))
    assert f["backlog_max_tokens"] == pytest.approx(8.0) and f["backlog_mean_tokens"] == pytest.approx(13 / 3)
    assert backlog_figures([[0, 0]])["backlog_imbalance"] is None


def test_a_retry_is_kept_only_if_it_ran_with_less_other_work() -> None:
    calm, busy, failed = {"other_cpu_cores": 0.05}, {"other_cpu_cores": 0.8}, {"error": "boom"}
    assert _better(busy, None) and _better(calm, failed) and _better(calm, busy)
    assert not _better(busy, calm) and not _better(failed, busy)


def _args(*argv: str) -> argparse.Namespace:
    from bench.compare_routers import build_parser, resolve

    a = resolve(build_parser().parse_args(["--trace", "x/conv_trace.jsonl", *argv]))
    a.base_rates = {t: 4.0 for t in a.traces}
    return a


def test_tables_run_fcfs_everywhere_with_uncached_first_beside() -> None:
    from bench.compare_routers import plan_sections

    a = _args(
        "--policies", "round-robin,swaserve-seed,sglang-cache-aware", "--workers", "8,32", "--sweep", "8"
    )
    sections = plan_sections(a)
    for w in (8, 32):
        main_runs = sections[f"main conv {w} workers"]
        ours = [(r.policy.name, r.fleet.queue_policy) for r in main_runs if r.policy.router == "swaserve"]
        assert ours == [("swaserve-seed", "fcfs"), ("swaserve-seed", None)]  # None: the sims' uncached-first
        assert all(r.fleet.queue_policy is None for r in main_runs if r.policy.router != "swaserve")
    assert all(r.fleet.queue_policy == "fcfs" for r in sections["sweep"] if r.policy.router == "swaserve")
    assert [r.fleet.queue_policy for r in sections["queue"]] == [None, "fcfs"]
    flipped = plan_sections(_args("--policies", "swaserve-seed", "--queue-policy", "uncached-first"))
    assert [r.fleet.queue_policy for r in flipped["main conv 8 workers"]] == [None, "fcfs"]
    assert "replicas" not in flipped


def test_router_replicas_add_runs_beside_one_replica() -> None:
    from bench.compare_routers import plan_sections

    sections = plan_sections(
        _args("--policies", "swaserve-seed,sglang-cache-aware", "--router-replicas", "4")
    )
    assert [(r.policy.name, r.fleet.router_replicas) for r in sections["replicas"]] == [
        ("swaserve-seed", 1),
        ("swaserve-seed", 4),
    ]
    assert sections["replicas"][0].key == sections["main conv 8 workers"][0].key  # the same run, once
    assert sections["replicas"][1].key.endswith("-r4")
    with pytest.raises(ValueError):
        FleetSpec(8, 1, router_replicas=0)
    with pytest.raises(SystemExit):
        _args("--trace", "y/conv_trace.jsonl")  # two traces named alike: run keys would collide


def test_run_keys_tell_window_and_queue_policy_apart() -> None:
    w = Workload(Path("x/conversation_trace.jsonl"), 0, 60, 8, 1)
    keys = {RunSpec(POLICIES["swaserve-seed"], w, FleetSpec(8, 1, queue_policy=q, window=win)).key
            for q in (None, "fcfs") for win in (0, 128)}  # fmt: skip
    assert len(keys) == 4 and all(k.startswith("conversation-w8-x8-") for k in keys)
    chunked = RunSpec(POLICIES["swaserve-seed"], w, FleetSpec(8, 1, chunk_size=4096))
    assert chunked.key == "conversation-w8-x8-win128-chunk4096-swaserve-seed"
    assert "--chunk-size" in _sim_flags(chunked.fleet, "m")
    assert "--chunk-size" not in _sim_flags(FleetSpec(8, 1), "m")
    ids_only = replace(w, prompt_blocks="blocks")
    assert RunSpec(POLICIES["swaserve-seed"], ids_only, FleetSpec(8, 1)).key not in {
        RunSpec(POLICIES["swaserve-seed"], w, FleetSpec(8, 1)).key
    }
    assert "--prompt-blocks" in ids_only.replay_argv(_FakeFleet(), Path("r.json"))


class _FakeFleet:  # what Workload.replay_argv reads of a fleet
    targets, model, prompt_mode = ["http://x"], "m", "ids"


def test_a_kept_run_made_with_other_prompts_is_redone() -> None:
    w = Workload(Path("x/conversation_trace.jsonl"), 0, 60, 8, 1)
    run = RunSpec(POLICIES["swaserve-seed"], w, FleetSpec(8, 1))
    assert _stale({"workload": {"time_scale": 1}}, run)  # before --prompt-blocks: ids only
    assert not _stale({"workload": {"prompt_blocks": "continue"}}, run)
    assert _stale(
        {"workload": {"prompt_blocks": "continue"}}, replace(run, workload=replace(w, prompt_blocks="blocks"))
    )


def test_session_cpu_counts_a_busy_child_in_its_own_session() -> None:
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while session_cpu_seconds([proc.pid]) < 0.3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert session_cpu_seconds([proc.pid]) < 5
        assert session_cpu_seconds([os.getpid() + 10**7]) == 0.0  # no such session
    finally:
        proc.kill()
        proc.wait()


# -- live ---------------------------------------------------------------------------------------
def _trace(path: Path) -> None:
    """20 requests, one a second: 4 conversations of 5 turns; a turn shares the previous turn's full blocks
    and replaces its partial last block, as in Mooncake's conversation trace."""
    lines, next_id = [], 0
    convs: list[list[int]] = [[] for _ in range(4)]
    for i in range(20):
        ids = convs[i % 4]
        ids += [next_id, next_id + 1]  # two more 512-token blocks, the last partial
        next_id += 2
        length = 512 * (len(ids) - 1) + 200
        lines.append(
            json.dumps({"timestamp": 1000 * i, "input_length": length, "output_length": 4, "hash_ids": ids})
        )
        ids[-1] = next_id  # the partial block becomes a full one with other content next turn
        next_id += 1
    path.write_text("\n".join(lines) + "\n")


def _available(policy: str) -> bool:
    if POLICIES[policy].router != "sglang":
        return True
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        return False
    return True


def test_harness_runs_two_policies_on_fresh_fleets_and_leaves_nothing_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from services.models.model_store import resolve_model

    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server")
    resolve_model("mimo-tiny")  # our router reads its tokenizer from it
    policies = ["swaserve-seed", "round-robin" if _available("round-robin") else "least-load"]
    trace = tmp_path / "conv_trace.jsonl"
    _trace(trace)
    out = tmp_path / "out"
    argv = ["--trace", str(trace), "--out-dir", str(out), "--workers", "2", "--policies", ",".join(policies),
            "--duration", "100", "--rate-scale", "1", "--time-scale", "10", "--sweep", "", "--hybrid-policies", "",
            "--no-queue-policy", "--router-replicas", "2"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "compare.json").read_text())
    runs = list(results["runs"].values())
    assert [r["policy"] for r in runs] == [*policies, "swaserve-seed"]  # + the 2-replica run
    assert [len(r["pids"]["router"]) for r in runs] == [1, 1, 2]
    assert runs[0]["queue_policy"] == runs[2]["queue_policy"] == "fcfs"  # fcfs on every fleet
    assert sum(runs[2]["decisions"].values()) >= 20  # both replicas' decisions, summed
    assert "swaserve-seed (fcfs) x2 routers" in printed and "2 router replicas vs 1" in printed
    for r in runs:
        assert r["sent"] == r["completed"] == 20 and r["failed"] == 0, r
        assert 0 < r["hit_rate"] <= r["ideal_hit_rate"] + 1e-9
        assert r["workload"]["time_scale"] == 10
        assert r["router_cpu_ms_per_req"] > 0 and r["fleet_cpu_ms_per_req"] > 0
        for pid in r["pids"]["router"] + r["pids"]["fleet"]:
            assert not Path(f"/proc/{pid}").exists(), f"process {pid} left running"
    assert printed.splitlines()[-1].startswith(f"| {policies[-1]} |")  # the table comes last
    assert "SIMULATED" in printed and "duration 100 s" in printed


# -- queue order on one worker, deterministic -----------------------------------------------------
def test_queue_des_prompts_share_blocks_by_hash_id_with_exact_lengths() -> None:
    from bench.compare.queue_des import prompt_from_blocks

    a, b = _req(0, (1, 2), 6), _req(1, (1, 3, 4), 10)
    pa, pb = prompt_from_blocks(a), prompt_from_blocks(b)
    assert (len(pa), len(pb)) == (6, 10)
    assert pa[:4] == pb[:4] and pa[4:] != pb[4:6]  # block id 1 shared, then 2 vs 3


def test_queue_des_uncached_first_serves_the_cheap_request_of_a_queue_first() -> None:
    from bench.compare.queue_des import Arrival, simulate

    # a long prompt computing at t = 0; then at once a second long one and a short one wait behind it
    long1, long2, short = (
        Arrival(0.0, tuple(range(40000))),
        Arrival(0.001, tuple(range(50000, 90000))),
        Arrival(0.002, tuple(range(100000, 100500))),
    )
    arrivals = [long1, long2, short]
    fcfs = {r["index"]: r["ttft_ms"] for r in simulate(arrivals, "fcfs")}
    uf = {r["index"]: r["ttft_ms"] for r in simulate(arrivals, "uncached-first")}
    assert uf[0] == pytest.approx(fcfs[0], rel=0.01)  # the prefill in progress is never overtaken
    assert uf[2] < fcfs[2] - 200  # the short one jumps the waiting long one, which loses ~nothing ...
    assert uf[1] == pytest.approx(fcfs[1], rel=0.01)
    assert uf[2] > 0.9 * uf[0]  # ... but not the one in prefill: it waits for it under either policy
    # a cached prefix counts as cheap: the same prompt again waits less than an uncached one of its length
    again = simulate([long1, Arrival(5.0, long1.prompt_ids)], "fcfs")
    assert again[1]["cached_tokens"] > 39000 and again[1]["ttft_ms"] < again[0]["ttft_ms"] / 5  # type: ignore[operator]
