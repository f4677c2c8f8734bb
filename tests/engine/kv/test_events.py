from collections.abc import Callable

import pytest

from services.common.block_hash import ROOT_HASH, BlockHash, hash_blocks
from services.common.kv_events import AllCleared, BlockRemoved, BlockStored, EventBuffer, KVEvent

HASHES = tuple(hash_blocks(list(range(8)), 4))

EVENTS: list[KVEvent] = [
    BlockStored("full", HASHES, ROOT_HASH, tuple(range(8)), 4),
    BlockStored("swa", HASHES[1:], HASHES[0], tuple(range(4, 8)), 4),
    BlockStored("full", (BlockHash(2**128 - 1),), BlockHash(1), (151643, 0), 2),
    BlockRemoved("swa", HASHES[:1]),
    BlockRemoved("full", ()),
    AllCleared(),
]


@pytest.mark.parametrize(
    "make",
    [
        lambda: BlockRemoved("mla", ()),  # type: ignore[arg-type]
        lambda: BlockStored("full", HASHES[:1], ROOT_HASH, (1, 2, 3), 4),  # 3 token ids for a page of 4
    ],
)
def test_malformed_events_are_rejected(make: Callable[[], KVEvent]) -> None:
    with pytest.raises(ValueError):
        make()


def test_stored_block_tokens() -> None:
    e = EVENTS[0]
    assert isinstance(e, BlockStored)
    assert e.block_tokens(1) == (4, 5, 6, 7)


def test_event_buffer_drains_in_order() -> None:
    buf = EventBuffer()
    for e in EVENTS[:3]:
        buf(e)
    assert len(buf) == 3
    assert buf.drain() == EVENTS[:3]
    assert buf.drain() == [] and len(buf) == 0


def test_event_buffer_is_bounded_and_counts_what_it_dropped():
    from services.common.kv_events import AllCleared, EventBuffer

    buf = EventBuffer(max_events=3)
    for _ in range(5):
        buf(AllCleared())
    assert len(buf) == 3 and buf.dropped == 2
    assert len(buf.drain()) == 3 and len(buf) == 0
