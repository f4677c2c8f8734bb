"""Prompt tokens per hash id: exact lengths, shared blocks identical, different blocks different."""

from __future__ import annotations

import random

import pytest

from bench.replay.plan import PlannedRequest
from bench.replay.prompts import Continuations, PromptBuilder, VocabRange
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


# -- continuations: a request that extends an earlier one's full blocks starts with that prompt ----
def _reqs(*specs: tuple[tuple[int, ...], int]) -> list[PlannedRequest]:
    return [_req(ids, n) for ids, n in specs]


def _built(reqs: list[PlannedRequest], **kw: object) -> tuple[Continuations, list[list[int]]]:
    cont = Continuations.plan(reqs, **kw)  # type: ignore[arg-type]
    b = PromptBuilder(continuations=cont)
    return cont, [b.token_ids(r) for r in reqs]


def test_a_next_turn_starts_with_the_previous_prompt_exactly() -> None:
    #            earlier: 2 full blocks + 10 tokens of id 3; later: id 3 grew (new id 4), then id 5
    cont, (p, r) = _built(_reqs(((1, 2, 3), 2 * BLOCK + 10), ((1, 2, 4, 5), 3 * BLOCK + 5)))
    assert len(p) == 2 * BLOCK + 10 and len(r) == 3 * BLOCK + 5
    assert r[: len(p)] == p
    assert r[len(p)] != PromptBuilder().block_tokens(3, BLOCK)[10]  # after it, the block's own tokens
    assert cont.inherit == {4: (3, 10)} and cont.continued == (0, 2 * BLOCK + 10)
    # ids only: the grown block is unrelated from its first token
    q = PromptBuilder().token_ids(_req((1, 2, 4, 5), 3 * BLOCK + 5))
    assert q[: 2 * BLOCK] == p[: 2 * BLOCK] and q[2 * BLOCK] != p[2 * BLOCK]


def test_the_same_blocks_with_a_longer_last_block_continue_too() -> None:
    _, (p, r) = _built(_reqs(((1, 2, 3), 2 * BLOCK + 10), ((1, 2, 4), 2 * BLOCK + 25)))
    assert r[: len(p)] == p and len(r) == 2 * BLOCK + 25


def test_one_shared_block_is_not_a_conversation() -> None:
    # every request of the conversation trace starts with the same block: no chaining of strangers
    cont, (p, r) = _built(_reqs(((0, 3), BLOCK + 10), ((0, 4, 5), 2 * BLOCK + 5)))
    assert cont.continued == (0, 0) and r[BLOCK] != p[BLOCK]
    cont, (p, r) = _built(_reqs(((0, 3), BLOCK + 10), ((0, 4, 5), 2 * BLOCK + 5)), min_shared=1)
    assert cont.continued == (0, BLOCK + 10) and r[: len(p)] == p


def test_the_latest_earlier_turn_that_fits_is_continued() -> None:
    cont, prompts = _built(
        _reqs(
            ((1, 2, 3), 2 * BLOCK + 10),  # turn 1
            ((1, 2, 6), 2 * BLOCK + 20),  # turn 2, still inside block 2: continues turn 1
            ((1, 2, 7), 2 * BLOCK + 31),  # a longer one than the next request's block: no fit
            ((1, 2, 8), 2 * BLOCK + 30),  # continues turn 2 (the latest shorter), so turn 1 too
        )
    )
    t1, t2, _, t4 = prompts
    assert t2[: len(t1)] == t1 and t4[: len(t2)] == t2
    assert cont.continued == (0, len(t1), len(t2), len(t2))


def test_a_block_already_seen_is_never_rebuilt() -> None:
    # id 4 appears first without a continuation; a later request that could continue into it keeps it
    cont, (a, p, r) = _built(
        _reqs(((1, 2, 4), 3 * BLOCK), ((1, 2, 3), 2 * BLOCK + 10), ((1, 2, 4, 5), 3 * BLOCK + 3))
    )
    assert r[: 3 * BLOCK] == a and r[2 * BLOCK] != p[2 * BLOCK]
    assert 4 not in cont.inherit and cont.continued[2] == 0


def test_a_full_last_block_is_not_continued_into_another_id() -> None:
    cont, (p, r) = _built(_reqs(((1, 2, 3), 3 * BLOCK), ((1, 2, 4, 5), 3 * BLOCK + 5)))
    assert cont.continued == (0, 0) and r[2 * BLOCK] != p[2 * BLOCK]


def _conversation_trace(rng: random.Random, block: int, n: int) -> list[PlannedRequest]:
    """Mooncake-like requests from an independent content model: each conversation is a sequence of
    symbols (a shared system prompt of one of two lengths, then its own), a request is a prefix of
    it, and hash ids are ids of the chained block contents, partial blocks included, as a trace has."""
    ids: dict[tuple[int, ...], int] = {}
    convs: list[list[int]] = []
    sent: list[int] = []  # per conversation, the length of its last request
    reqs = []
    for k in range(n):
        if not convs or rng.random() < 0.3:
            system = [-1] * rng.choice([block, 2 * block + 3])
            convs.append(system + [rng.randrange(1 << 30) for _ in range(6 * block)])
            sent.append(len(system) + rng.randrange(1, 2 * block))
            c = len(convs) - 1
        else:
            c = rng.randrange(len(convs))
            grow = rng.choice([0, 1, 3, block // 2, block, 2 * block + 5])  # 0: sent again as it was
            sent[c] = min(len(convs[c]), sent[c] + grow)
        length = sent[c]
        hashes = tuple(
            ids.setdefault(tuple(convs[c][: min(length, (i + 1) * block)]), len(ids))
            for i in range(-(-length // block))
        )
        reqs.append(PlannedRequest(k, 0.0, length, 1, hashes, block))
    return reqs


def _reference_parent(reqs: list[PlannedRequest], k: int) -> int | None:
    """Literally the rule, by brute force: the latest earlier request whose ids are R's first i ids
    (i >= 2: R's leading ids sent before, its next id new) plus one partial block shorter than R's."""
    r = reqs[k]
    earlier = {h for x in reqs[:k] for h in x.hash_ids}
    i = 0
    while i < len(r.hash_ids) and r.hash_ids[i] in earlier:
        i += 1
    if i < 2 or i == len(r.hash_ids):
        return None
    take = min(BLOCK, r.input_length - i * BLOCK)
    for j in range(k - 1, -1, -1):
        p = reqs[j]
        tail = p.input_length - i * BLOCK
        if (
            len(p.hash_ids) == i + 1
            and tuple(p.hash_ids[:i]) == tuple(r.hash_ids[:i])
            and tail < min(take, BLOCK)
        ):
            return j
    return None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traces_lengths_continuations_and_equal_ids(seed: int) -> None:
    reqs = _conversation_trace(random.Random(seed), BLOCK, 150)
    cont = Continuations.plan(reqs)
    b = PromptBuilder(VocabRange(0, 10**9), seed=seed, continuations=cont)
    prompts = [b.token_ids(r) for r in reqs]
    assert [len(p) for p in prompts] == [r.input_length for r in reqs]
    parents = [_reference_parent(reqs, k) for k in range(len(reqs))]
    assert sum(p is not None for p in parents) >= 10  # the traces do hold next turns
    for k, j in enumerate(parents):
        if j is not None:
            assert prompts[k][: len(prompts[j])] == prompts[j], k
        assert cont.continued[k] == (0 if j is None else reqs[j].input_length)
    blocks: dict[int, list[int]] = {}  # an id's tokens wherever it appears: prefixes of one block
    for r, p in zip(reqs, prompts, strict=True):
        for i, h in enumerate(r.hash_ids):
            got = p[i * BLOCK : (i + 1) * BLOCK]
            have = blocks.setdefault(h, got)
            short, long = sorted((got, have), key=len)
            assert long[: len(short)] == short
            blocks[h] = long
    assert sum(len(v) == BLOCK for v in blocks.values()) > 50
