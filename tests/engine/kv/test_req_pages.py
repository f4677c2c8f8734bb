"""ReqPages against a plain model of memory: every slot remembers which position was written to it."""

import math
import random

import pytest

from services.engine.kv.page_pool import OutOfPages, PagePool
from services.engine.kv.req_pages import ReqPages, swa_keep_start


def _pools(full=2000, swa=64, page=16):
    return PagePool(full, page, "full"), PagePool(swa, page, "swa")


def _run_step(rp, end, full_mem, swa_mem, window):
    st = rp.plan_step(end)
    # what a layer reads must be exactly the positions it needs, as written before
    assert [full_mem[s] for s in st.full_read] == list(range(0, st.start))
    assert [swa_mem[s] for s in st.swa_read] == list(range(max(0, st.start - window), st.start))
    for s, pos in zip(st.full_write, range(st.start, st.end), strict=True):
        full_mem[s] = pos
    for s, pos in zip(st.swa_write, range(st.swa_write_start, st.end), strict=True):
        swa_mem[s] = pos
    rp.commit_step(end)
    return st


@pytest.mark.parametrize("page, window", [(16, 128), (4, 8), (1, 8), (8, 8)])
@pytest.mark.parametrize("chunks", ["decode-only", "chunk-7", "chunk-300", "one-shot"])
def test_reads_see_the_right_positions_and_swa_stays_bounded(page, window, chunks):
    full, swa = _pools(full=3000 // page + 10, swa=math.ceil(window / page) + 4, page=page)
    rp = ReqPages(full, swa, window)
    full_mem, swa_mem = {}, {}
    n = 2500
    step = {"decode-only": 1, "chunk-7": 7, "chunk-300": 300, "one-shot": n}[chunks]
    bound = math.ceil(window / page) + 1
    end = 0
    while end < n:
        end = min(n, end + step)
        _run_step(rp, end, full_mem, swa_mem, window)
        assert len(rp.swa) <= bound
        assert swa.num_used == rp.swa_pages_in_use == len(rp.swa)
    assert full.num_used == math.ceil(n / page)
    rp.release_all()
    assert full.num_used == 0 and swa.num_used == 0


def test_ten_thousand_tokens_swa_pages_never_exceed_window_pages():
    full, swa = _pools(full=700, swa=20)
    rp = ReqPages(full, swa, 128)
    fm, sm = {}, {}
    rng = random.Random(0)
    end, peak = 0, 0
    while end < 10_000:
        end = min(10_000, end + rng.choice([1, 1, 1, 5, 64, 200, 513]))
        _run_step(rp, end, fm, sm, 128)
        peak = max(peak, swa.num_used)
    assert peak <= math.ceil(128 / 16) + 1
    assert rp.kv_len == 10_000


def test_prefix_pages_hold_the_tail_of_the_aligned_prefix():
    full, swa = _pools(page=4)
    rp = ReqPages(full, swa, 8)
    fm, sm = {}, {}
    _run_step(rp, 30, fm, sm, 8)  # aligned prefix 28, its SWA tail is [20, 28)
    fp, sp = rp.prefix_pages(28)
    assert len(fp) == 7 and len(sp) == 7
    assert [i for i, p in enumerate(sp) if p is not None] == [5, 6]
    assert swa_keep_start(30, 4, 8) == 20


def test_adopted_prefix_is_shared_and_new_tokens_never_write_into_it():
    full, swa = _pools(page=4)
    a = ReqPages(full, swa, 8)
    fm, sm = {}, {}
    _run_step(a, 16, fm, sm, 8)
    fp, sp = a.prefix_pages(16)
    b = ReqPages(full, swa, 8)
    b.adopt_prefix(16, fp, sp)
    assert all(full.refcount(p) == 2 for p in fp)
    st = b.plan_step(40)
    assert not set(st.full_write) & {p * 4 + o for p in fp for o in range(4)}
    assert not set(st.swa_write) & {p * 4 + o for p in sp if p is not None for o in range(4)}
    assert [sm[s] for s in st.swa_read] == list(range(8, 16))


def test_adopt_refuses_a_prefix_without_its_swa_tail():
    full, swa = _pools(page=4)
    rp = ReqPages(full, swa, 8)
    with pytest.raises(ValueError, match="window-safe"):
        rp.adopt_prefix(8, [0, 1], [None, 3])


def test_out_of_pages_changes_nothing():
    full, swa = PagePool(3, 4, "full"), PagePool(8, 4, "swa")
    rp = ReqPages(full, swa, 8)
    rp.plan_step(8)
    rp.commit_step(8)
    before = (list(rp.full), dict(rp.swa), full.num_free, swa.num_free)
    with pytest.raises(OutOfPages):
        rp.plan_step(20)
    assert (list(rp.full), dict(rp.swa), full.num_free, swa.num_free) == before
