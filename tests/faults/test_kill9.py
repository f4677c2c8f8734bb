"""kill -9 of one service under a steady open-loop load on a real `swaserve up` fleet (mimo-tiny,
2 prefill + 2 decode workers, 1 GCache node, its own Redis), one test per service. Each prints what the
fault cost (tests/faults/report.py) and checks the goals of issue 15:

- G1: 0 failed among requests that had not streamed a token (plain requests count: none streams);
- G2: a stream cut by the fault ends with an error event within CUT_BOUND_S of the kill (never hangs);
- G3: routing recovers within one heartbeat TTL: no request sent later than TTL after the kill fails;
- G4: no survivor's RSS or fd count grows past the margins in report.py across the fault.

A goal a fault does not meet today is listed in that test's `gaps` with the reason (docs/reliability.md)
and printed as NOT MET with its figure instead of failing the test; every other goal is asserted.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.registry import WorkerRegistry
from tests.faults.fleet import HEARTBEAT_TTL, MODEL, Fleet, swaserve_fleet
from tests.faults.front import RoundRobinFront
from tests.faults.load import OpenLoad
from tests.faults.report import FaultReport

pytestmark = pytest.mark.faults

RATE = 3.0  # requests per second (half streamed); mimo-tiny on 2 cores answers 24 tokens in ~1 s
BEFORE_S, AFTER_S = 6.0, HEARTBEAT_TTL + 6.0  # load before / after the kill
CUT_BOUND_S = 10.0
GOALS = ("G1", "G2", "G3", "G4")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with swaserve_fleet(Path(tmp_path_factory.mktemp("faults")) / "run") as f:
        yield f


def _goals(r: FaultReport) -> dict[str, str]:
    """Each goal that failed, with the figure that shows it."""
    out = {}
    if fails := sum(r.failed_before_token.values()):
        out["G1"] = f"{fails} failed before a token: {dict(r.failed_before_token)}"
    if r.cut_without_error or (r.cut_end_s is not None and r.cut_end_s > CUT_BOUND_S):
        out["G2"] = (
            f"{r.cut_without_error} cut streams without an error event; last ended {r.cut_end_s}s after"
        )
    if r.last_fail_sent_after_s is not None and r.last_fail_sent_after_s > HEARTBEAT_TTL:
        out["G3"] = f"a request sent {r.last_fail_sent_after_s:.1f}s after the kill failed"
    if leaks := r.leaks():
        out["G4"] = "; ".join(leaks)
    return out


def run_fault(
    fleet: Fleet, victim: str, capsys: pytest.CaptureFixture[str], gaps: dict[str, str],
    base: str = "", metrics_base: str = "", keepalive: bool = True,
) -> FaultReport:  # fmt: skip
    """The load on `base` (the router), the kill at BEFORE_S, AFTER_S more load, the report;
    `metrics_base`: the router whose retry counter is read (a survivor)."""
    base = base or fleet.base
    fleet.wait_healthy()
    warm = OpenLoad([base], RATE, seed=1, keepalive=keepalive).start()  # every path warm before the baseline
    time.sleep(3)
    warm.stop()
    warm.join(60)
    time.sleep(1)
    before = fleet.stats(exclude=victim)
    retries0 = fleet.metric("swaserve_router_retries_total", metrics_base)
    load = OpenLoad([base], RATE, seed=sum(map(ord, victim)), keepalive=keepalive).start()
    try:
        time.sleep(BEFORE_S)
        killed_at = time.monotonic()
        fleet.kill(victim)
        time.sleep(AFTER_S)
    finally:  # never leave the load running into the next test
        load.stop()
        load.join(90)
    fleet.wait_healthy()  # the supervisor restarted the victim
    time.sleep(3)  # the load's connections closed on both ends
    report = FaultReport.build(
        f"kill -9 {victim}", load.outcomes, killed_at, fleet.metric("swaserve_router_retries_total", metrics_base) - retries0,
        before, fleet.stats(exclude=victim),
    )  # fmt: skip
    failed = _goals(report)
    with capsys.disabled():
        print("\n" + report.text())
        for goal, why in sorted(failed.items()):
            print(f"  {goal} NOT MET{' (known: ' + gaps[goal] + ')' if goal in gaps else ''}: {why}")
    unexpected = {g: why for g, why in failed.items() if g not in gaps}
    assert not unexpected, f"{unexpected}\n{report.text()}\n{fleet.diag()}"
    assert report.answered > 0, report.text()
    # never hangs, even where G2's error event is a known gap
    assert report.cut_end_s is None or report.cut_end_s <= CUT_BOUND_S, report.text()
    return report


def test_kill_prefill_worker(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run_fault(fleet, "prefill-0", capsys, gaps={})


def test_kill_decode_worker(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    gaps = {
        "G1": "a plain request decoding on the dead worker gets 503 worker_unavailable: the router retries "
        "only before the first token, and has no request migration (docs/reliability.md)"
    }
    run_fault(fleet, "decode-0", capsys, gaps=gaps)


def test_kill_redis(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run_fault(fleet, "redis", capsys, gaps={})
    # swaserve up restarted it empty; the workers' heartbeats (every TTL/3) registered them again
    registry = WorkerRegistry(fleet.redis_url)
    try:
        roles = sorted(r.role for r in registry.list(model=MODEL))
    finally:
        registry.redis.close()
    assert roles == ["decode"] * fleet.decode + ["prefill"] * fleet.prefill, roles


def test_kill_gcache_node(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run_fault(fleet, "gcache-0", capsys, gaps={})


def test_kill_router_replica(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Two routers (swaserve up's and a second one over the same Redis) behind a round-robin TCP front
    (tests/faults/front.py: skips a backend that refuses to connect, retries nothing else); a new
    connection per request, so that the front balances requests. swaserve up's router is killed."""
    port_a = int(fleet.base.rsplit(":", 1)[1])
    port_b = fleet.start_router_replica()
    with RoundRobinFront([("127.0.0.1", port_a), ("127.0.0.1", port_b)]) as front:
        gaps = {
            "G1": "a request inside the killed router dies with its TCP connection; the front retries only "
            "a refused connect, the 'retry on the other replica before the first token' policy is the client's "
            "(tests/integration/test_router_replicas.py) or an HTTP-aware front's",
            "G2": "a dead router cannot send an error event: its streams end at once with the connection "
            "(the client sees an incomplete chunked body, no hang)",
        }
        run_fault(fleet, "router", capsys, gaps=gaps, base=front.url, metrics_base=f"http://127.0.0.1:{port_b}",
                  keepalive=False)  # fmt: skip
        with capsys.disabled():
            print(
                f"  front: {front.connections} connections, {front.skipped} refused by a backend and passed on"
            )
