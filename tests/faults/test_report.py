"""The fault report's arithmetic on hand-made outcomes (no fleet; runs in `make test`)."""

from __future__ import annotations

import os

from tests.faults.fleet import ProcStats, proc_stats
from tests.faults.load import Outcome
from tests.faults.report import FaultReport


def _o(i: int, sent: float, ended: float, **kw: object) -> Outcome:
    o = Outcome(i, stream=bool(kw.pop("stream", True)), base="b", sent_at=sent, ended_at=ended)
    for k, v in kw.items():
        setattr(o, k, v)
    return o


def test_outcomes_are_classified_and_timed_from_the_kill() -> None:
    kill = 100.0
    outcomes = [
        _o(0, 98.0, 99.0, status="200", tokens=5, ttft=0.2, finished=True),  # answered before
        _o(1, 99.0, 100.3, status="200", tokens=2, ttft=0.4, error_event=True),  # cut, error event
        _o(2, 99.5, 100.1, status="200", tokens=1, ttft=0.1),  # cut, no error event (connection)
        _o(3, 99.8, 100.2, stream=False, status="503"),  # plain, failed before a token
        _o(4, 101.0, 101.2, status="ConnectError"),  # failed after the kill
        _o(5, 102.0, 103.5, stream=False, status="200", tokens=24, finished=True),  # first success after
        _o(6, 103.0, 103.4, status="200", tokens=4, ttft=0.3, finished=True),
    ]
    r = FaultReport.build("x", outcomes, kill, 2.0, {}, {})
    assert (r.sent, r.answered) == (7, 3)
    assert r.failed_before_token == {"503": 1, "ConnectError": 1}
    assert (r.cut_with_error, r.cut_without_error) == (1, 1)
    assert abs(r.cut_end_s - 0.3) < 1e-9  # type: ignore[operator]
    assert abs(r.first_ok_after_s - 3.4) < 1e-9  # type: ignore[operator]  # #6 ended before #5
    assert abs(r.last_fail_sent_after_s - 1.0) < 1e-9  # type: ignore[operator]
    assert r.ttft_p50_before == 0.2 and r.ttft_p50_after == 0.3
    assert abs(r.e2e_max_after - 1.5) < 1e-9  # type: ignore[operator]


def test_leaks_use_the_margins_and_a_gcache_node_its_tier() -> None:
    mib = 1024
    before = {n: ProcStats(100 * mib, 20) for n in ("router", "decode-0", "gcache-0", "redis")}
    after = {
        "router": ProcStats(100 * mib, 28),  # +8 fds: at the margin
        "decode-0": ProcStats(134 * mib, 20),  # > 1.25x + 8 MiB
        "gcache-0": ProcStats(190 * mib, 20),  # 1.25x + 8 MiB + its 64 MiB tier = 197 MiB
        "redis": ProcStats(100 * mib, 29),  # +9 fds
    }
    leaks = FaultReport.build("x", [], 0.0, 0.0, before, after).leaks()
    assert [line.split(":")[0] for line in leaks] == ["decode-0", "redis"]


def test_proc_stats_reads_this_process_and_not_a_dead_one() -> None:
    me = proc_stats(os.getpid())
    assert me is not None and me.rss_kib > 1000 and me.fds >= 3
    assert proc_stats(2**22 + 12345) is None
