"""Routing-time residency in the prefix index (services/common/pending_residency.py): a pending entry
counts as the worker's blocks, window-safe at the prompt's end only; it leaves when the worker's
events make it true, when it expires, when the request is withdrawn, or with the worker's state.
Checked against an independent reference: a second index in which the pending pages are real."""

from __future__ import annotations

import random

import pytest

from services.common.block_hash import BlockHash, hash_blocks
from services.common.pending_residency import PendingEntry, PendingLayer, swa_pages
from services.common.pending_wire import PendingMessage, pack_hashes, unpack_hashes
from services.common.prefix_index import PrefixIndex
from services.common.prefix_index import WorkerMatch as M

PAGE, WINDOW = 4, 8  # need = 2 pages
NEED = 2


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def pages(ids: list[int]) -> tuple[BlockHash, ...]:
    return tuple(hash_blocks(ids, PAGE))


def entry(
    pid: str, worker: str, full: tuple[BlockHash, ...], deadline: float = 2000.0, branch: int = 0
) -> PendingEntry:
    return PendingEntry(pid, worker, full, swa_pages(full, NEED, branch), deadline)


@pytest.fixture
def index() -> PrefixIndex:
    ix = PrefixIndex(PAGE, WINDOW)
    ix.clock = Clock()
    return ix


def test_a_pending_prompt_is_window_safe_at_its_end_and_raw_before(index: PrefixIndex) -> None:
    prompt = pages(list(range(40)))  # 10 pages
    assert index.add_pending(entry("r1", "w", prompt))
    assert index.match(prompt)["w"] == M(10, 10)
    sibling = prompt[:6] + pages(list(range(24)) + [999] * 16)[6:]  # shares 6 pages, then diverges
    m = index.match(sibling)["w"]
    assert m.raw_blocks == 6 and m.safe_blocks == 0  # no SWA at the branch: not a hit (window-safe)
    # the real index says the same once the worker's events are in
    real = PrefixIndex(PAGE, WINDOW)
    real.store("w", "full", prompt)
    real.store("w", "swa", prompt[-NEED:])
    assert real.match(sibling)["w"] == m and real.match(prompt)["w"] == M(10, 10)


def test_a_branch_point_the_worker_will_checkpoint_is_safe_too(index: PrefixIndex) -> None:
    prompt = pages(list(range(40)))
    index.add_pending(entry("r1", "w", prompt, branch=6))
    assert index.match(prompt[:6])["w"] == M(6, 6)
    assert index.match(prompt[:7])["w"] == M(7, 6)  # page 6 ends no window-safe prefix


def test_siblings_overlap_and_leave_one_by_one(index: PrefixIndex) -> None:
    a = pages(list(range(40)))
    b = a[:6] + pages(list(range(24)) + [7] * 16)[6:]
    index.add_pending(entry("a", "w", a))
    index.add_pending(entry("b", "w", b))
    assert index.drop_pending("a")
    assert index.match(a)["w"].raw_blocks == 6  # b still holds the shared pages
    assert index.match(b)["w"] == M(10, 10)
    assert not index.drop_pending("a")
    index.drop_pending("b")
    assert index.match(b)["w"] == M(0, 0) and index.pending.masks == {"full": {}, "swa": {}}


def test_the_workers_events_replace_it_and_a_late_entry_is_not_added(index: PrefixIndex) -> None:
    prompt = pages(list(range(40)))
    index.add_pending(entry("r1", "w", prompt))
    index.store("w", "full", prompt)
    assert "r1" in index.pending  # the window's SWA is not in yet
    index.store("w", "swa", prompt[-NEED:])
    assert "r1" not in index.pending and index.pending.replaced == 1
    index.remove("w", "full", prompt[5:])  # evicted: the index says so at once (no pending left)
    assert index.match(prompt)["w"] == M(5, 0)
    index.store("w", "full", prompt[5:])
    assert not index.add_pending(entry("r2", "w", prompt))  # the events came first: nothing to add


def test_expiry_clear_and_leave_drop_entries(index: PrefixIndex) -> None:
    clock = index.clock
    assert isinstance(clock, Clock)
    p1, p2 = pages(list(range(40))), pages(list(range(100, 140)))
    index.add_pending(entry("a", "w1", p1, deadline=1005))
    index.add_pending(entry("b", "w2", p2, deadline=1010))
    index.add_pending(entry("c", "w2", p1, deadline=1010))
    clock.t = 1005
    assert "w1" not in {w for w, m in index.match(p1).items() if m.raw_blocks}
    assert index.pending.expired == 1
    index.clear("w2")  # the worker reset its cache: what was routed before is gone too
    assert len(index.pending) == 0
    index.add_pending(entry("d", "w2", p2))
    index.remove_worker("w2")
    assert len(index.pending) == 0 and all(m.raw_blocks == 0 for m in index.match(p2).values())
    assert not index.add_pending(entry("e", "w3", p2, deadline=1000))  # already expired


def test_the_wire_round_trips() -> None:
    full = pages(list(range(40)))
    e = PendingEntry("r", "w", full, swa_pages(full, NEED), 0.0, "inc1")
    msg = PendingMessage.of(e, 2500)
    fields = {k.encode(): v.encode() if isinstance(v, str) else v for k, v in msg.to_fields().items()}
    back = PendingMessage.from_fields(fields)
    assert back == msg and back.entry(1_000_000) == PendingEntry(
        "r", "w", full, e.swa, 1002.5, "inc1", 0, 1000.0
    )
    with pytest.raises(ValueError):
        PendingMessage.from_fields({**fields, b"k": b"what"})
    with pytest.raises(ValueError):
        PendingMessage.from_fields({**fields, b"f": b"\x00" * 15})


@pytest.mark.parametrize("seed", range(8))
def test_random_pending_entries_match_like_real_blocks(seed: int) -> None:
    """Index with pending entries == an index where every live entry's pages were stored for real."""
    rng = random.Random(seed)
    clock = Clock()
    ix = PrefixIndex(PAGE, WINDOW)
    ix.clock = clock
    workers = [f"w{i}" for i in range(4)]
    roots = [[rng.randrange(50) for _ in range(rng.randrange(4, 60))] for _ in range(6)]

    def prompt() -> list[int]:
        base = rng.choice(roots)
        return base[: rng.randrange(len(base) + 1)] + [rng.randrange(50) for _ in range(rng.randrange(0, 30))]

    live: dict[str, PendingEntry] = {}
    real: dict[str, tuple[set[BlockHash], set[BlockHash]]] = {w: (set(), set()) for w in workers}
    for step in range(200):
        clock.t += rng.random()
        op = rng.random()
        w = rng.choice(workers)
        if op < 0.45:
            full = pages(prompt())
            if full:
                e = entry(
                    f"p{step}",
                    w,
                    full,
                    deadline=clock.t + rng.uniform(0.5, 20),
                    branch=rng.randrange(len(full)),
                )
                if ix.add_pending(e):
                    live[e.pid] = e
        elif op < 0.6 and live:
            pid = rng.choice(sorted(live))
            ix.drop_pending(pid)
            live.pop(pid)
        elif op < 0.85:
            full = pages(prompt())
            kind = rng.choice(["full", "swa"])
            hs = [h for h in full if rng.random() < 0.7]
            ix.store(w, kind, hs)
            real[w][0 if kind == "full" else 1].update(hs)
        elif op < 0.97:
            full = pages(prompt())
            kind = rng.choice(["full", "swa"])
            ix.remove(w, kind, full)
            real[w][0 if kind == "full" else 1].difference_update(full)
        else:
            ix.clear(w)
            real[w] = (set(), set())
            live = {p: e for p, e in live.items() if e.worker != w}
        # what the index should still hold: not expired, not satisfied by the real state
        ix.match(())  # expiry runs on match
        live = {p: e for p, e in live.items() if e.deadline > clock.t}
        live = {p: e for p, e in live.items() if p in ix.pending}
        assert set(live) == {e.pid for e in ix.pending.entries()}
        ref = PrefixIndex(PAGE, WINDOW)
        for wk in workers:
            ref.store(wk, "full", real[wk][0])
            ref.store(wk, "swa", real[wk][1])
        for e in live.values():
            ref.store(e.worker, "full", e.full)
            ref.store(e.worker, "swa", e.swa)
        q = pages(prompt())
        got = ix.match(q, workers)
        want = ref.match(q, workers)
        assert got == want, (step, q)


# -- the layer's representation against per-hash counting (what it replaced) -----------------------
class CountedLayerReference:
    """The mask layer as it was before per-worker counts became lazy: a count per (bit, kind, hash)
    for every entry. Kept here as the reference the real layer's masks must equal."""

    def __init__(self) -> None:
        self.masks: dict[str, dict[BlockHash, int]] = {"full": {}, "swa": {}}
        self.counts: dict[tuple[int, str], dict[BlockHash, int]] = {}
        self.entries: dict[str, tuple[PendingEntry, int]] = {}

    def add(self, e: PendingEntry, bit: int) -> bool:
        if e.pid in self.entries:
            return False
        self.entries[e.pid] = (e, bit)
        for kind in ("full", "swa"):
            own = self.counts.setdefault((bit, kind), {})
            for h in e.hashes(kind):  # type: ignore[arg-type]
                own[h] = own.get(h, 0) + 1
                if own[h] == 1:
                    self.masks[kind][h] = self.masks[kind].get(h, 0) | (1 << bit)
        return True

    def drop(self, pid: str) -> None:
        e, bit = self.entries.pop(pid)
        for kind in ("full", "swa"):
            own = self.counts[(bit, kind)]
            for h in e.hashes(kind):  # type: ignore[arg-type]
                own[h] -= 1
                if own[h] == 0:
                    del own[h]
                    m = self.masks[kind][h] & ~(1 << bit)
                    if m:
                        self.masks[kind][h] = m
                    else:
                        del self.masks[kind][h]


@pytest.mark.parametrize("seed", range(12))
def test_layer_masks_equal_per_hash_counting_on_random_operations(seed: int) -> None:
    """Entries overlapping within and across workers (hashes listed twice too), added and dropped in
    random order, one by one or a worker at a time, expired: the masks equal the reference's."""
    rng = random.Random(seed)
    layer, ref = PendingLayer(), CountedLayerReference()
    universe = [BlockHash(rng.getrandbits(128)) for _ in range(40)]
    n = 0
    for _ in range(300):
        op = rng.random()
        live = list(ref.entries)
        if op < 0.5 or not live:
            n += 1
            full = tuple(rng.choice(universe) for _ in range(rng.randrange(1, 12)))
            swa = tuple(rng.sample(full, rng.randrange(0, len(full) + 1)))
            e = PendingEntry(f"p{n}", "w", full, swa, float(rng.randrange(100)))
            bit = rng.randrange(4)
            assert layer.add(e, bit) == ref.add(e, bit)
            assert not layer.add(e, bit)  # by pid: once
        elif op < 0.85:
            pid = rng.choice(live)
            layer.drop(pid)
            ref.drop(pid)
        elif op < 0.93:
            bit = rng.randrange(4)
            gone = [p for p, (_, b) in ref.entries.items() if b == bit]
            assert layer.drop_bit(bit) == len(gone)
            for pid in gone:
                ref.drop(pid)
        else:
            now = float(rng.randrange(100))
            gone = [p for p, (e, _) in ref.entries.items() if e.deadline <= now]
            assert layer.expire(now) == len(gone)
            for pid in gone:
                ref.drop(pid)
        assert layer.masks == ref.masks
        assert sorted(e.pid for e in layer.entries()) == sorted(ref.entries)
    for pid in list(ref.entries):
        layer.drop(pid)
    assert layer.masks == {"full": {}, "swa": {}} and len(layer) == 0


@pytest.mark.parametrize("seed", range(6))
def test_the_packed_wire_form_is_the_packed_hashes(seed: int) -> None:
    """A message handed its full pages already packed writes the same fields as one packing them."""
    rng = random.Random(seed)
    full = tuple(BlockHash(rng.getrandbits(128)) for _ in range(rng.randrange(1, 300)))
    e = PendingEntry("r", "w", full, swa_pages(full, NEED), 0.0, "inc")
    packed = b"".join(h.to_bytes(16, "big") for h in full)
    assert pack_hashes(full) == packed and unpack_hashes(packed) == full
    assert PendingMessage.of(e, 900, packed).to_fields() == PendingMessage.of(e, 900).to_fields()
    assert PendingMessage.of(e, 900, packed) == PendingMessage.of(e, 900)
    with pytest.raises(ValueError):
        PendingMessage.of(e, 900, packed[:-16])
    fields = {
        k.encode(): v.encode() if isinstance(v, str) else v
        for k, v in PendingMessage.of(e, 9).to_fields().items()
    }
    assert PendingMessage.peek(fields) == ("pend", "r")
    with pytest.raises(ValueError):
        PendingMessage.peek({**fields, b"k": b"what"})
