import array
import hashlib
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from services.common.block_hash import (
    ROOT_HASH,
    BlockHash,
    ItemHash,
    hash_block,
    hash_blocks,
    hash_from_hex,
    hash_item,
    hash_to_hex,
    hashes_of,
    item_extras,
)


def reference_hash(parent: int, tokens: list[int], extra: bytes | None) -> int:
    """The documented encoding, written out again with hashlib alone."""
    data = b"swaserve.block.v1" + parent.to_bytes(16, "big") + len(tokens).to_bytes(4, "big")
    data += b"".join(t.to_bytes(4, "big") for t in tokens)
    data += b"\x00" if extra is None else b"\x01" + len(extra).to_bytes(4, "big") + extra
    return int.from_bytes(hashlib.blake2b(data, digest_size=16).digest(), "big")


def test_pinned_digest() -> None:
    # pinned literally: changing the encoding breaks every stored key and must be deliberate
    assert hash_to_hex(hash_block(ROOT_HASH, [1, 2, 3, 4])) == "186dd9f46debd31f813c937298dbaf7e"
    assert hash_to_hex(hash_item(b"cat.png")) == "94297f4435d182bfe1daf17689ed91d8"


@pytest.mark.parametrize(
    ("parent", "tokens", "extra"),
    [
        (0, [1, 2, 3, 4], None),
        (0, [0], None),
        (0, [], None),
        (2**128 - 1, [2**32 - 1, 0, 151643], None),
        (12345, [7, 7, 7, 7], b""),
        (12345, [7, 7, 7, 7], b"\x00" * 16),
    ],
)
def test_matches_independent_reimplementation(parent: int, tokens: list[int], extra: bytes | None) -> None:
    assert hash_block(BlockHash(parent), tokens, extra) == reference_hash(parent, tokens, extra)


def test_chaining_and_extras_change_the_hash() -> None:
    page = [5, 6, 7, 8]
    a = hash_block(ROOT_HASH, page)
    b = hash_block(a, page)
    assert a != b  # same page, different parent
    assert len({a, hash_block(ROOT_HASH, page, b""), hash_block(ROOT_HASH, page, b"img")}) == 3
    assert hash_block(ROOT_HASH, page, b"img1") != hash_block(ROOT_HASH, page, b"img2")
    # the token count is part of the encoding: [1] + [] is not [] + [1]
    assert hash_block(ROOT_HASH, [1, 0]) != hash_block(ROOT_HASH, [1])


@pytest.mark.parametrize(
    ("num_tokens", "page_size", "num_hashes"),
    [(0, 4, 0), (3, 4, 0), (4, 4, 1), (7, 4, 1), (8, 4, 2), (10_000, 16, 625), (10_001, 16, 625), (5, 1, 5)],
)
def test_one_hash_per_full_page(num_tokens: int, page_size: int, num_hashes: int) -> None:
    tokens = [i % 97 for i in range(num_tokens)]
    hashes = hash_blocks(tokens, page_size)
    assert len(hashes) == num_hashes
    h = ROOT_HASH
    for i, got in enumerate(hashes):
        h = BlockHash(reference_hash(h, tokens[i * page_size : (i + 1) * page_size], None))
        assert got == h


def test_hash_blocks_extras_and_continuation() -> None:
    tokens = list(range(12))
    plain = hash_blocks(tokens, 4)
    mixed = hash_blocks(tokens, 4, [None, b"x", None])
    assert mixed[0] == plain[0]
    assert mixed[1] != plain[1] and mixed[2] != plain[2]  # the chain carries page 1's extra onward
    assert hash_blocks(tokens, 4, [None, None, None]) == plain
    # an extra for the trailing partial page is accepted and ignored
    assert hash_blocks(tokens + [1], 4, [None, None, None, b"y"]) == plain
    # continuing a chain from a parent gives the same hashes as hashing the whole
    assert hash_blocks(tokens[4:], 4, parent=plain[0]) == plain[1:]
    with pytest.raises(ValueError):
        hash_blocks(tokens, 4, [None] * 4)
    with pytest.raises(ValueError):
        hash_blocks(tokens, 0)


@pytest.mark.parametrize("bad", [[-1], [2**32], [1, -5]])
def test_token_ids_out_of_range_raise(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        hash_block(ROOT_HASH, bad)
    with pytest.raises(ValueError):
        hash_blocks(bad, 1)


@pytest.mark.parametrize("seed", range(5))
def test_hash_blocks_is_the_documented_chain_on_random_input(seed: int) -> None:
    rng = random.Random(seed)
    page = rng.choice([1, 3, 16, 64])
    tokens = [rng.choice([0, 2**32 - 1, rng.randrange(2**32)]) for _ in range(rng.randrange(0, 700))]
    pages = -(-len(tokens) // page)
    extras = [rng.choice([None, b"", rng.randbytes(rng.randrange(1, 40))]) for _ in range(pages)]
    parent = rng.choice([0, rng.randrange(2**128)])
    h = parent
    want = []
    for i in range(len(tokens) // page):
        h = reference_hash(h, tokens[i * page : (i + 1) * page], extras[i])
        want.append(h)
    assert hash_blocks(tokens, page, extras, parent=BlockHash(parent)) == want


def test_item_extras() -> None:
    a, b = ItemHash(1), ItemHash(2)
    ab = a.to_bytes(16, "big")
    bb = b.to_bytes(16, "big")
    # 10 tokens, pages of 4: item a on [1, 5) touches pages 0, 1; item b on [5, 6) page 1 only
    assert item_extras(10, 4, [(a, 1, 5), (b, 5, 6)]) == [ab, ab + bb, None]
    assert item_extras(8, 4, []) == [None, None]
    with pytest.raises(ValueError):
        item_extras(8, 4, [(a, 6, 9)])
    assert hash_item(b"x") != hash_item(b"y")


def test_hex_round_trip() -> None:
    for h in (ROOT_HASH, hash_block(ROOT_HASH, [1]), BlockHash(2**128 - 1)):
        s = hash_to_hex(h)
        assert len(s) == 32 and hash_from_hex(s) == h
    with pytest.raises(ValueError):
        hash_from_hex("abc")


def test_stable_across_processes() -> None:
    code = (
        "from services.common.block_hash import hash_blocks, hash_to_hex;"
        "print(','.join(hash_to_hex(h) for h in hash_blocks(list(range(40)), 8, [None, b'e'])))"
    )
    want = ",".join(hash_to_hex(h) for h in hash_blocks(list(range(40)), 8, [None, b"e"]))
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == want


@pytest.mark.parametrize("seed", range(4))
def test_hash_blocks_same_for_every_input_type_on_long_random_prompts(seed: int) -> None:
    # hash_blocks packs all pages at once (numpy) and chains digests as bytes: check it against the
    # page-by-page reference on long prompts, for each sequence type the services pass in
    rng = random.Random(seed)
    page = rng.choice([1, 16, 64])
    tokens = [rng.choice([0, 2**32 - 1, rng.randrange(2**32)]) for _ in range(rng.randrange(3000, 9000))]
    extras: list[bytes | None] | None = None
    if seed % 2:  # a few pages with extras (b"" included: an empty extra is not no extra)
        extras = [None] * (-(-len(tokens) // page))
        for i in rng.sample(range(len(extras)), 5):
            extras[i] = rng.choice([b"", rng.randbytes(16)])
    h, want = 0, []
    for i in range(len(tokens) // page):
        h = reference_hash(h, tokens[i * page : (i + 1) * page], extras[i] if extras else None)
        want.append(h)
    for seq in (tokens, array.array("I", tokens), np.array(tokens, dtype=np.uint64), tuple(tokens)):
        assert hash_blocks(seq, page, extras) == want


@pytest.mark.parametrize("bad", [np.array([1, -1]), np.array([2**32]), np.array([1.0, 2.0]), [1, 2.0]])
def test_bad_token_arrays_raise(bad: object) -> None:
    with pytest.raises(ValueError):
        hash_blocks(bad, 1)  # type: ignore[arg-type]


@pytest.mark.parametrize("page", [1, 16, 22, 23, 64, 300])  # messages of 1 block, of exactly 2, of several
def test_c_chain_and_hashlib_chain_give_the_reference_hashes(page: int) -> None:
    from services.common import block_hash as bh

    if bh._NATIVE is None:
        pytest.skip(f"{bh.NATIVE_LIBRARY.name} not built (scripts/setup.sh builds it with cc)")
    rng = random.Random(page)
    tokens = [rng.choice([0, 2**32 - 1, rng.randrange(2**32)]) for _ in range(page * rng.randrange(1, 40))]
    msgs = bh._page_messages(np.array(tokens, dtype=np.uint32), page)
    parent = rng.randbytes(16)
    h, want = int.from_bytes(parent, "big"), b""
    for i in range(len(tokens) // page):
        h = reference_hash(h, tokens[i * page : (i + 1) * page], None)
        want += h.to_bytes(16, "big")
    assert bh._chain(msgs, parent) == bh._chain_python(msgs, parent) == want
    if bh._NATIVE_PAGES is not None:  # the pages' messages built in C, from the ids themselves
        assert bh._hash_pages(np.array(tokens, dtype=np.uint32), page, parent) == want


def test_pure_python_hashing_is_chosen_by_the_environment() -> None:
    code = (
        "from services.common import block_hash as b; print(b._NATIVE is None, b.hash_blocks([1] * 32, 16))"
    )
    env = dict(os.environ, SWASERVE_PURE_HASH="1")
    pure = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert pure.stdout.startswith("True ")
    assert pure.stdout.split(" ", 1)[1].strip() == str(hash_blocks([1] * 32, 16))


@pytest.mark.parametrize("seed", range(4))
def test_hashes_of_reads_each_16_bytes_as_a_big_endian_int(seed: int) -> None:
    rng = random.Random(seed)
    digests = bytes([0] * 16 + [255] * 16) + rng.randbytes(16 * rng.randrange(0, 400))
    want = [int.from_bytes(digests[i : i + 16], "big") for i in range(0, len(digests), 16)]
    assert hashes_of(digests) == want and hashes_of(b"") == []
    with pytest.raises(ValueError):
        hashes_of(digests[:-1])
