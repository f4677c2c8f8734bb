"""Reasoning apart from the answer: golden outputs, whole and streamed at every cut; where it ends."""

from __future__ import annotations

import pytest

from services.router.reasoning import ReasoningParser
from tests.router.toolcalls.golden import Case, every_split, expected, run

# (case, the prompt opened <think>)
CASES = [
    (
        Case(
            "opened by the template", "\nI should add.\n</think>\n\n4", content="4", reasoning="I should add."
        ),
        True,
    ),
    (
        Case("opened by the model", "<think>\nhmm ☃\n</think>\n\nYes.", content="Yes.", reasoning="hmm ☃"),
        False,
    ),
    (Case("leading space, then <think>", "  <think>a</think>b", content="b", reasoning="a"), False),
    (Case("no <think> first: all answer", "Sure <think>x</think>", content="Sure <think>x</think>"), False),
    (Case("cut short while thinking", "<think>\nstep 1\nstep 2\n", reasoning="step 1\nstep 2"), False),
    (Case("empty reasoning (thinking off)", "<think>\n\n</think>\n\nHi", content="Hi"), False),
    (
        Case("partial end tag inside reasoning", "a </thin b</think>c", content="c", reasoning="a </thin b"),
        True,
    ),
    (Case("a partial <think> alone", "<thi", content="<thi"), False),
    (
        Case("inner whitespace kept", "<think>a\n\n b</think>\n x \n", content="x \n", reasoning="a\n\n b"),
        False,
    ),
]


@pytest.mark.parametrize(("case", "opened"), CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_golden_whole_and_cut_everywhere(case: Case, opened: bool) -> None:
    want = expected(case)
    for chunks in every_split(case.text):
        assert run(lambda: ReasoningParser(opened), chunks) == want, chunks


@pytest.mark.parametrize("cut", range(0, 30, 3))
def test_end_offset_is_just_after_the_end_tag(cut: int) -> None:
    text = "<think>why not</think>\n\nanswer text"
    parser = ReasoningParser(False)
    parser.feed(text[:cut])
    parser.feed(text[cut:])
    parser.finish()
    assert parser.saw_reasoning
    assert parser.end_offset == text.index("</think>") + len("</think>")


def test_no_reasoning_no_offset() -> None:
    parser = ReasoningParser(False)
    parser.parse("just an answer")
    assert not parser.saw_reasoning and parser.end_offset is None
