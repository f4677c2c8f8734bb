"""services/common/json_ids: the C reader of token-id arrays against a reference written from JSON's
grammar (json.loads + the strict-form rules), on random and hand-picked inputs."""

from __future__ import annotations

import array
import json
import random
import re

import pytest

from services.common import json_ids
from services.common.json_ids import read_id_array

pytestmark = pytest.mark.skipif(
    not json_ids.reader_built(),
    reason=f"{json_ids.NATIVE_LIBRARY.name} not built (scripts/setup.sh builds it with cc)",
)

_STRICT = re.compile(rb"\[[ \t\n\r]*(?:0|[1-9][0-9]*)(?:[ \t\n\r]*,[ \t\n\r]*(?:0|[1-9][0-9]*))*[ \t\n\r]*\]")


def reference(body: bytes, at: int) -> tuple[list[int], int] | None:
    """The strict form by regular expression, the values by the stdlib's JSON parser."""
    m = _STRICT.match(body, at)
    if m is None:
        return None
    ids = json.loads(m.group(0))
    if any(v > 2**32 - 1 for v in ids):
        return None
    return ids, m.end()


def check(body: bytes, at: int = 0) -> tuple[array.array[int], int] | None:
    got = read_id_array(body, at)
    want = reference(body, at)
    if want is None:
        assert got is None, body[at : at + 80]
        return None
    assert got is not None, body[at : at + 80]
    assert got[0].tolist() == want[0] and got[1] == want[1]
    assert got[0].typecode == "I"
    return got


def _ws(rng: random.Random) -> str:
    return "".join(rng.choice(" \t\n\r") for _ in range(rng.choice((0, 0, 0, 1, 2))))


def test_random_arrays_match_the_reference() -> None:
    rng = random.Random(7)
    for _ in range(300):
        ids = [
            rng.choice((0, 1, rng.randrange(10), rng.randrange(2**32), 2**32 - 1))
            for _ in range(rng.randrange(1, 200))
        ]
        text = "[" + _ws(rng) + ("," + _ws(rng)).join(str(v) + _ws(rng) for v in ids) + "]"
        pad = "x" * rng.randrange(3)
        body = (pad + text + ',"rest": 1}').encode()
        got = check(body, len(pad))
        assert got is not None and got[0].tolist() == ids


def test_random_corruptions_match_the_reference() -> None:
    """One character of a valid array replaced, inserted or cut: the reader agrees with the
    reference on every result (most are not the strict form any more)."""
    rng = random.Random(11)
    alphabet = '0123456789,[] \n-+.eEtrufalsn"x'
    for _ in range(3000):
        ids = [
            rng.randrange(2**32) if rng.random() < 0.3 else rng.randrange(1000)
            for _ in range(rng.randrange(1, 12))
        ]
        text = list("[" + ", ".join(map(str, ids)) + "]")
        i = rng.randrange(len(text) + 1)
        op = rng.randrange(3)
        if op == 0 and i < len(text):
            text[i] = rng.choice(alphabet)
        elif op == 1:
            text.insert(i, rng.choice(alphabet))
        else:
            del text[i : i + rng.randrange(1, 4)]
        check("".join(text).encode())


@pytest.mark.parametrize(
    "text",
    ["[]", "[ ]", "[1,]", "[,1]", "[01]", "[00]", "[-1]", "[1.0]", "[1e3]", "[1E3]", "[true]", "[false]",
     "[[1]]", "[1 2]", "[4294967296]", "[99999999999999999999]", "[1", "[1,", "[ 1 ,", "[+1]", '["1"]',
     "[0x10]", "[1]", "[0]", "[4294967295]", "[ 0 , 1 ,\t2\n]", "[1]]"],
)  # fmt: skip
def test_edges(text: str) -> None:
    check(text.encode())


def test_not_an_array_at_the_offset() -> None:
    assert read_id_array(b'{"a": [1]}', 0) is None
    assert read_id_array(b"[1]", 3) is None
    assert read_id_array(b"[1]", -1) is None
    assert read_id_array(b"", 0) is None
