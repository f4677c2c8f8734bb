"""Packed prompt ids: through a serialized message they read back as they went in."""

from __future__ import annotations

import array
import random
import struct

import pytest

from services.common.prompt_wire import pack_ids, prompt_ids_of, token_array, unpack_ids
from services.proto_gen import worker_pb2

MESSAGES = [worker_pb2.PrefillRequest, worker_pb2.DecodeRequest]


def _wire(msg):  # what a receiver gets: serialized, then parsed
    return type(msg).FromString(msg.SerializeToString())


@pytest.mark.parametrize("cls", MESSAGES)
@pytest.mark.parametrize("seed", range(6))
def test_packed_reads_back_as_it_went_in(cls, seed):
    rng = random.Random(seed)
    n = rng.choice([1, 2, 63, 64, 65, rng.randrange(1, 40_000)])
    top = rng.choice([2, 50_000, 2**31 - 1, 2**32])
    ids = [rng.randrange(top) for _ in range(n)]
    packed = _wire(cls(rid="r", prompt_ids_packed=pack_ids(ids)))
    assert prompt_ids_of(packed) == ids
    assert len(packed.prompt_ids_packed) == 4 * n


def test_layout_is_little_endian_uint32():
    ids = [0, 1, 258, 2**31, 2**32 - 1]  # the packed form also holds ids the int32 field cannot
    assert pack_ids(ids) == struct.pack("<5I", *ids)
    assert unpack_ids(pack_ids(ids)) == ids


@pytest.mark.parametrize(
    "given", [[1, 2, 3], (1, 2, 3), array.array("I", [1, 2, 3]), array.array("q", [1, 2, 3])]
)
def test_any_int_sequence_packs_the_same(given):
    assert pack_ids(given) == pack_ids([1, 2, 3])


def test_token_array_keeps_an_array_of_uint32_as_is():
    arr = array.array("I", [5, 6])
    assert token_array(arr) is arr
    assert token_array([5, 6]) == arr and token_array([5, 6]) is not arr


@pytest.mark.parametrize("bad", [[-1], [2**32], [1.0], ["1"], [None]])
def test_pack_rejects_what_is_not_a_uint32(bad):
    with pytest.raises(ValueError, match="token ids must be ints"):
        pack_ids(bad)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 4001])
def test_unpack_rejects_a_partial_id(size):
    with pytest.raises(ValueError, match="not a whole number of 4-byte ids"):
        unpack_ids(b"\x01" * size)


@pytest.mark.parametrize("cls", MESSAGES)
def test_no_prompt_reads_as_empty(cls):
    assert prompt_ids_of(_wire(cls(rid="r"))) == []
    assert pack_ids([]) == b"" and unpack_ids(b"") == []
