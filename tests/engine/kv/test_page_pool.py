import pytest

from services.engine.kv.page_pool import OutOfPages, PagePool


def test_alloc_gives_distinct_pages_in_range() -> None:
    pool = PagePool(8, 16, "full")
    a = pool.alloc(3)
    b = pool.alloc(5)
    assert len(set(a + b)) == 8 and all(0 <= p < 8 for p in a + b)
    assert (pool.num_free, pool.num_used) == (0, 8)
    assert all(pool.refcount(p) == 1 for p in a + b)
    assert pool.alloc(0) == []


def test_out_of_pages_allocates_nothing() -> None:
    pool = PagePool(4, 16, "swa")
    pool.alloc(3)
    with pytest.raises(OutOfPages):
        pool.alloc(2)
    assert pool.num_free == 1
    assert len(pool.alloc(1)) == 1


@pytest.mark.parametrize(
    ("increfs", "decrefs", "freed", "refs_left"),
    [
        (0, 1, 1, 0),  # the allocation's reference is the last
        (1, 1, 0, 1),
        (2, 3, 1, 0),
        (2, 2, 0, 1),
    ],
)
def test_refcounts(increfs: int, decrefs: int, freed: int, refs_left: int) -> None:
    pool = PagePool(2, 4, "full")
    (page,) = pool.alloc(1)
    for _ in range(increfs):
        pool.incref([page])
    got = sum(pool.decref([page]) for _ in range(decrefs))
    assert got == freed
    assert pool.refcount(page) == refs_left
    assert pool.num_used == (1 if refs_left else 0)


def test_duplicate_ids_in_one_call_count_twice() -> None:
    pool = PagePool(2, 4, "full")
    (page,) = pool.alloc(1)
    pool.incref([page, page])
    assert pool.refcount(page) == 3
    assert pool.decref([page, page, page]) == 1
    assert pool.num_free == 2


def test_decref_of_free_page_raises_and_changes_nothing() -> None:
    pool = PagePool(4, 4, "full")
    a, b = pool.alloc(2)
    pool.decref([b])
    with pytest.raises(ValueError):
        pool.decref([b])
    with pytest.raises(ValueError):
        pool.decref([a, b])  # a valid, b free: all or nothing
    assert pool.refcount(a) == 1
    with pytest.raises(ValueError):
        pool.decref([a, a])  # more references than a holds
    assert pool.refcount(a) == 1
    with pytest.raises(ValueError):
        pool.incref([b])
    with pytest.raises(ValueError):
        pool.refcount(4)


def test_freed_pages_are_reused() -> None:
    pool = PagePool(3, 4, "full")
    pages = pool.alloc(3)
    assert pool.decref(pages[:2]) == 2
    again = pool.alloc(2)
    assert sorted(again) == sorted(pages[:2])
    assert "used=3/3" in repr(pool)
