"""BlockKey: 16 bytes exactly, equal to plain bytes, hex in logs, namespaces that separate."""

from __future__ import annotations

import pytest

from services.common.block_hash import hash_blocks, hash_to_hex
from services.gcache.keys import BlockKey, as_key


def test_block_hash_key_is_its_big_endian_bytes_and_hex():
    (h,) = hash_blocks(list(range(16)), 16)
    key = BlockKey.for_block(h)
    assert len(key) == 16 and key == h.to_bytes(16, "big")
    assert key.hex() == str(key) == hash_to_hex(h)
    assert repr(key) == f"BlockKey({hash_to_hex(h)})"
    assert BlockKey.from_hex(key.hex()) == key
    assert as_key(h) == as_key(key) == as_key(bytes(key)) == key
    assert {bytes(key): 1}[key] == 1  # dicts accept either form


def test_namespaces_and_strings_separate_domains():
    h = 12345
    plain, full, swa = BlockKey.for_block(h), BlockKey.for_block(h, "m/full"), BlockKey.for_block(h, "m/swa")
    assert len({plain, full, swa}) == 3
    assert BlockKey.for_block(h, "m/full") == full  # deterministic
    assert BlockKey.for_str("abc") == BlockKey.for_str("abc") != BlockKey.for_str("abd")
    assert BlockKey.for_str("m/full") != full


@pytest.mark.parametrize("raw", [b"", b"x" * 15, b"x" * 17])
def test_wrong_length_is_refused(raw):
    with pytest.raises(ValueError):
        BlockKey(raw)


def test_bad_hex_is_refused():
    with pytest.raises(ValueError):
        BlockKey.from_hex("ab")


def test_ring_point_is_the_first_eight_bytes():
    key = BlockKey(bytes(range(16)))
    assert key.ring_point == int.from_bytes(bytes(range(8)), "big")
