"""Prompt tokens per hash id: exact lengths, shared blocks identical, different blocks different."""

from __future__ import annotations

import pytest

from bench.replay.plan import PlannedRequest
from bench.replay.prompts import PromptBuilder, VocabRange
from bench.word_tokens import text_to_ids

BLOCK = 32


def _req(ids: tuple[int, ...], length: int) -> PlannedRequest:
    return PlannedRequest(
        index=0, send_at_s=0.0, input_length=length, output_length=1, hash_ids=ids, block_size=BLOCK
    )


@pytest.mark.parametrize("length", [1, 31, 32, 33, 64, 95])
def test_exact_length(length: int) -> None:
    n = -(-length // BLOCK)
    assert len(PromptBuilder().token_ids(_req(tuple(range(n)), length))) == length


def test_shared_leading_blocks_are_identical_and_the_rest_differs() -> None:
    b = PromptBuilder()
    a = b.token_ids(_req((0, 1, 2), 90))
    c = b.token_ids(_req((0, 1, 5, 6), 120))
    assert a[: 2 * BLOCK] == c[: 2 * BLOCK]
    # the third blocks differ from their very first token (ids are random over ~100k values)
    assert a[2 * BLOCK] != c[2 * BLOCK]
    assert sum(x == y for x, y in zip(a[2 * BLOCK :], c[2 * BLOCK : 90], strict=True)) <= 1


def test_a_partial_block_is_the_start_of_the_same_block_in_full() -> None:
    b = PromptBuilder()
    full = b.token_ids(_req((4, 8), 64))
    part = b.token_ids(_req((4, 8), 40))
    assert part == full[:40]


def test_blocks_depend_on_the_id_not_the_position() -> None:
    b = PromptBuilder()
    first = b.token_ids(_req((9,), 32))
    later = b.token_ids(_req((1, 9), 64))
    assert later[32:] == first


def test_another_prompt_scale_gives_other_tokens() -> None:
    # a run at another scale (block size) must not find this run's prompts in a server's cache
    b = PromptBuilder()
    assert b.block_tokens(0, 16) != b.block_tokens(0, 32)[:16]


def test_many_ids_give_distinct_blocks() -> None:
    b = PromptBuilder()
    blocks = {tuple(b.block_tokens(h, BLOCK)) for h in range(2000)}
    assert len(blocks) == 2000


def test_deterministic_across_builders_and_changed_by_the_seed() -> None:
    req = _req((3, 1), 50)
    assert PromptBuilder(seed=1).token_ids(req) == PromptBuilder(seed=1).token_ids(req)
    assert PromptBuilder(seed=1).token_ids(req) != PromptBuilder(seed=2).token_ids(req)


@pytest.mark.parametrize(("low", "high"), [(100, 100_000), (100, 49_152), (0, 3)])
def test_ids_stay_in_the_vocabulary_range(low: int, high: int) -> None:
    ids = PromptBuilder(VocabRange(low, high)).token_ids(_req(tuple(range(30)), 30 * BLOCK))
    assert min(ids) >= low and max(ids) < high
    assert len(set(ids)) >= min(high - low, 500)  # 960 draws spread over the range


def test_text_mode_is_one_word_per_token() -> None:
    b = PromptBuilder()
    req = _req((0, 1), 45)
    text = b.prompt(req, "text")
    assert isinstance(text, str)
    assert len(text.split()) == 45
    assert text_to_ids(text) == b.prompt(req, "ids")


@pytest.mark.parametrize(("spec", "expected"), [("100:100000", (100, 100_000)), ("0:49152", (0, 49_152))])
def test_vocab_range_parse(spec: str, expected: tuple[int, int]) -> None:
    v = VocabRange.parse(spec)
    assert (v.low, v.high) == expected


@pytest.mark.parametrize("spec", ["100", "5:5", "9:3", "-1:10", "a:b"])
def test_vocab_range_refuses(spec: str) -> None:
    with pytest.raises(ValueError):
        VocabRange.parse(spec)
