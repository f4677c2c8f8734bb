"""The `prompt` union of /v1/completions: what each JSON shape validates to, and what is refused."""

from __future__ import annotations

import array
from typing import Any

import pytest
from pydantic import ValidationError

from services.router.openai_schema import CompletionRequest


def _prompt(p: Any) -> Any:
    return CompletionRequest.model_validate({"model": "m", "prompt": p}, strict=True).prompt


@pytest.mark.parametrize("ids", [[0], [1, 2, 3], [2**32 - 1, 0, 7], list(range(5000))])
def test_a_flat_id_list_becomes_an_array_of_uint32(ids: list[int]) -> None:
    got = _prompt(ids)
    assert isinstance(got, array.array) and got.typecode == "I" and got.tolist() == ids


@pytest.mark.parametrize("p", ["text", ["a", "b"], [[1, 2], [3]]])
def test_other_shapes_stay_as_sent(p: Any) -> None:
    assert _prompt(p) == p


BAD = [
    [1, True],
    [False],
    [True] * 3,
    [1, 2.0],
    [-1, 2],
    [2**32],
    [2**70],
    [1, "2"],
    [1, None],
    [1, [2]],
    [[1], [True]],
    [[1], []],
    [],
]


@pytest.mark.parametrize("p", BAD, ids=[repr(p) for p in BAD])
def test_anything_else_is_refused_on_the_prompt_field(p: Any) -> None:
    with pytest.raises(ValidationError) as e:
        _prompt(p)
    assert [err["loc"] for err in e.value.errors()] == [("prompt",)]


def test_token_ids_reject_bools_anywhere_like_a_plain_check() -> None:
    """_token_ids against the plain definition, on random lists with bools, 0s and 1s placed anywhere."""
    import random

    from services.router.openai_schema import _token_ids

    rng = random.Random(5)
    for _ in range(300):
        n = rng.choice([1, 5, 80, 2000])
        v: list[object] = [rng.choice([0, 1, rng.randrange(2**32)]) for _ in range(n)]
        for _ in range(rng.choice([0, 0, 1, 3])):
            v[rng.randrange(n)] = rng.choice([True, False])
        plain = all(type(t) is int and 0 <= t < 2**32 for t in v)
        got = _token_ids(v)
        assert (got is not None) == plain
        if got is not None:
            assert list(got) == v
