"""Incremental detokenization and stop-string trimming: streamed pieces add up to the final text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from services.router.textstream import ChoiceText, IncrementalDetokenizer, StopTrimmer
from services.router.tokenization import RouterTokenizer

TEXTS = [
    "plain ascii text, nothing special.",
    "Snowman ☃, 你好世界, emoji 🎉🙂 and café — ünïcödé.",
    "👨‍👩‍👧‍👦 family, 🇫🇷 flag, Ω≈ç√∫ maths",
    "\n\n  indented\tand tabs  \n",
]


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> RouterTokenizer:
    return RouterTokenizer(model_dir)


def _chunks(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 3)
        out.append(ids[i : i + n])
        i += n
    return out


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_pieces_add_up_to_the_text(tok: RouterTokenizer, text: str) -> None:
    ids = tok.encode(text, add_special_tokens=False)
    for seed in range(5):
        detok = IncrementalDetokenizer(tok.decode)
        pieces = [detok.push(c) for c in _chunks(ids, random.Random(seed))]
        pieces.append(detok.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)  # a split character is held back, never emitted


def test_multibyte_character_is_held_until_complete(tok: RouterTokenizer) -> None:
    ids = tok.encode(" ☃", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits the snowman's three bytes
    detok = IncrementalDetokenizer(tok.decode)
    assert [detok.push([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1:]) == " ☃"


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok: RouterTokenizer) -> None:
    ids = tok.encode(" ☃", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok.decode)
    assert detok.push(ids[:-1]) == ""
    assert detok.flush() == " \ufffd"


@pytest.mark.parametrize(
    "pieces, stops, sent, matched",
    [
        (["hello world"], ["STOP"], "hello world", None),
        (["one STOP two"], ["STOP"], "one ", "STOP"),
        (["one ST", "OP two"], ["STOP"], "one ", "STOP"),
        (["one S", "T", "O", "P"], ["STOP"], "one ", "STOP"),
        (["one ST", "ART"], ["STOP"], "one START", None),  # a false start is released
        (["a\n\nb"], ["\n\n", "b"], "a", "\n\n"),  # the earliest stop wins
        (["xyz"], ["yz", "x"], "", "x"),
        (["abc"], [], "abc", None),
        (["ab", "c", "de"], ["cd"], "ab", "cd"),
    ],
)
def test_stop_trimmer(pieces: list[str], stops: list[str], sent: str, matched: str | None) -> None:
    trim = StopTrimmer(stops)
    out = "".join(trim.feed(p) for p in pieces) + trim.flush()
    assert out == sent
    assert trim.matched == matched


def test_stop_trimmer_holds_back_a_possible_start() -> None:
    trim = StopTrimmer(["<end>"])
    assert trim.feed("text <e") == "text "
    assert trim.feed("n") == ""
    assert trim.feed("x") == "<enx"


def test_choice_text_hides_eos_and_cuts_stop(tok: RouterTokenizer) -> None:
    ids = tok.encode("alpha beta STOP gamma", add_special_tokens=False)
    text = ChoiceText(tok, ["STOP"], frozenset({2}), logprobs=True)
    deltas = [text.push([t], [-1.0]) for t in ids]
    assert "".join(d.text for d in deltas) + text.finish() == "alpha beta "
    assert text.stopped
    text2 = ChoiceText(tok, [], frozenset({2}), logprobs=True)
    d = text2.push([*ids, 2], [-0.5] * (len(ids) + 1))
    assert d.text + text2.finish() == "alpha beta STOP gamma"
    assert [e.token_id for e in d.logprobs] == ids  # eos is not part of the text, nor of logprobs
    assert b"".join(e.bytes for e in d.logprobs).decode() == "alpha beta STOP gamma"
    assert [e.text_offset for e in d.logprobs][:2] == [0, len("alpha")]


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_through_is_the_fewest_tokens_holding_the_characters(tok: RouterTokenizer, text: str) -> None:
    """Against brute force (the first prefix long enough), for every character count, asked after
    each chunk as the router asks it."""
    ids = tok.encode(text, add_special_tokens=False)
    rng = random.Random(7)
    choice = ChoiceText(tok, (), frozenset(), False)
    pushed: list[int] = []
    for chunk in _chunks(ids, rng):
        choice.push(chunk, [])
        pushed += chunk
        longest = len(tok.decode(pushed))
        for chars in range(longest + 1):
            want = next(k for k in range(len(pushed) + 1) if len(tok.decode(pushed[:k])) >= chars)
            assert choice.tokens_through(chars) == want, (chars, pushed)
