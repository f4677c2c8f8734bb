import json

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


@pytest.mark.parametrize("event", EVENTS)
def test_round_trip_through_json(event: KVEvent) -> None:
    wire = json.dumps(event.to_dict())
    back = KVEvent.from_dict(json.loads(wire))
    assert back == event and type(back) is type(event)


def test_hashes_travel_as_hex_strings() -> None:
    d = EVENTS[0].to_dict()
    assert d["type"] == "stored" and d["parent_hash"] == "0" * 32
    assert all(isinstance(h, str) and len(h) == 32 for h in d["block_hashes"])


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "bogus"},
        {},
        {"type": "removed", "kind": "mla", "block_hashes": []},
        {"type": "stored", "kind": "full", "block_hashes": ["0" * 32], "parent_hash": "0" * 32,
         "token_ids": [1, 2, 3], "page_size": 4},
    ],
)  # fmt: skip
def test_from_dict_rejects_malformed(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        KVEvent.from_dict(bad)


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
