"""Least outstanding requests first, round-robin among ties."""

from __future__ import annotations

from collections import Counter

from services.router.picker import LeastOutstandingPicker
from services.router.workers import StaticWorkerPool, WorkerInfo

WORKERS = [WorkerInfo(f"w{i}:1", "decode") for i in range(3)]


def test_ties_rotate() -> None:
    picker = LeastOutstandingPicker()
    firsts = [picker.rank(WORKERS)[0].addr for _ in range(6)]
    assert Counter(firsts) == {"w0:1": 2, "w1:1": 2, "w2:1": 2}


def test_least_outstanding_first_and_release() -> None:
    picker = LeastOutstandingPicker()
    picker.acquire("w0:1")
    picker.acquire("w0:1")
    picker.acquire("w1:1")
    for _ in range(3):
        assert [w.addr for w in picker.rank(WORKERS)] == ["w2:1", "w1:1", "w0:1"]
    picker.release("w0:1")
    picker.release("w0:1")
    assert picker.outstanding("w0:1") == 0
    assert picker.rank(WORKERS)[-1].addr == "w1:1"


def test_assignment_spreads_load() -> None:
    picker = LeastOutstandingPicker()
    for _ in range(9):
        picker.acquire(picker.rank(WORKERS)[0].addr)
    assert [picker.outstanding(w.addr) for w in WORKERS] == [3, 3, 3]


def test_empty_and_static_pool_mark_down() -> None:
    assert LeastOutstandingPicker().rank([]) == []
    pool = StaticWorkerPool(["p:1"], ["d:1", "d:2"], down_seconds=60)
    pool.mark_down("d:1")
    assert [w.addr for w in pool.decode_workers()] == ["d:2"]
    assert [w.role for w in pool.prefill_workers()] == ["prefill"]
    assert StaticWorkerPool(["p:1"], ["d:1"], down_seconds=0).decode_workers()[0].addr == "d:1"


def test_interleaved_roles_each_rotate() -> None:
    """Prefill and decode ranks alternate in the dispatcher; each role must still rotate over its workers."""
    picker = LeastOutstandingPicker()
    prefills = [WorkerInfo(f"p{i}:1", "prefill") for i in range(2)]
    decodes = [WorkerInfo(f"d{i}:1", "decode") for i in range(2)]
    firsts: Counter[str] = Counter()
    for _ in range(4):
        firsts[picker.rank(prefills)[0].addr] += 1
        firsts[picker.rank(decodes)[0].addr] += 1
    assert firsts == {"p0:1": 2, "p1:1": 2, "d0:1": 2, "d1:1": 2}
