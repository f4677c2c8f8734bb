"""The output parsers streamed equal the one-shot parse, for any text and any chunking (hypothesis);
reasoning then tool calls in one chunk; cuts at every token (so every byte) of a real tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from services.router.assistant import AssistantOutput, OutputParsing
from services.router.reasoning import ReasoningParser
from services.router.textstream import ChoiceText
from services.router.toolcalls.hermes import HermesToolParser
from services.router.toolcalls.mimo import MimoToolParser
from services.router.toolcalls.pieces import ParsedMessage, Piece, collect
from tests.router.toolcalls.golden import TOOLS, Parser, run

FRAGMENTS = [
    "<tool_call>", "</tool_call>", "<function=get_weather>", "<function=search>", "<function=nope>",
    "</function>", "<parameter=city>", "<parameter=days>", "<parameter=tags>", "</parameter>",
    "<think>", "</think>", "<tool_", "</think", "<function=", "<param", "\n", "\n\n", " ", "Paris", "3",
    '["a"]', "null", '{"name": "search", "arguments": {"q": 1}}', '{"name": "get_weather", "arguments": "{}"}',
    "<", ">", "=", "/", '"', "☃", "é", "🎉", "x",
]  # fmt: skip

PARSERS: dict[str, Callable[[], Parser]] = {
    "mimo": lambda: MimoToolParser(TOOLS),
    "hermes": lambda: HermesToolParser(TOOLS),
    "mimo one call": lambda: MimoToolParser(TOOLS, max_calls=1),
    "reasoning opened": lambda: ReasoningParser(True),
    "reasoning": lambda: ReasoningParser(False),
    "reasoning + mimo": lambda: AssistantOutput(OutputParsing(reasoning=True, tools=TOOLS, parser="mimo")),
    "reasoning + hermes": lambda: AssistantOutput(
        OutputParsing(reasoning=True, in_reasoning=True, tools=TOOLS, parser="hermes")
    ),
}


@st.composite
def chunked_text(draw: st.DrawFn) -> tuple[str, list[str]]:
    parts = draw(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=40))
    text = "".join(parts)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(text)), max_size=12))))
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def _arguments_are_objects(msg: ParsedMessage) -> bool:
    return all(isinstance(json.loads(c.arguments), dict) for c in msg.calls)


@pytest.mark.parametrize("name", PARSERS)
@settings(max_examples=300, deadline=None)
@given(sample=chunked_text())
def test_streamed_equals_one_shot(name: str, sample: tuple[str, list[str]]) -> None:
    text, chunks = sample
    make = PARSERS[name]
    whole = run(make, [text])
    assert run(make, chunks) == whole
    assert _arguments_are_objects(whole)


def test_one_chunk_ends_the_reasoning_and_starts_a_call() -> None:
    out = AssistantOutput(OutputParsing(reasoning=True, in_reasoning=True, tools=TOOLS, parser="mimo"))
    first = out.feed("I need the weather")
    chunk = out.feed(
        " in Oslo.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</para"
    )
    rest = out.feed("meter>\n</function>\n</tool_call>") + out.finish()
    assert first == [Piece("reasoning", "I need the weather")]
    assert chunk == [Piece("reasoning", " in Oslo."), Piece("call", "get_weather", 0)]
    assert rest == [Piece("args", '{"city": "Oslo"}', 0)]
    assert out.called and out.reasoning_end is not None


def test_tool_calls_in_the_reasoning_are_reasoning() -> None:
    out = AssistantOutput(OutputParsing(reasoning=True, tools=TOOLS, parser="hermes"))
    text = '<think>maybe <tool_call>{"name": "search", "arguments": {}}</tool_call></think>no'
    msg = collect(out.parse(text))
    assert msg.calls == [] and msg.content == "no" and "<tool_call>" in msg.reasoning


class _Tok:
    def __init__(self, tok: Tokenizer) -> None:
        self._tok = tok

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        return b""


def test_token_cuts_of_a_real_tokenizer(model_dir: Path) -> None:
    """Byte-level BPE splits ☃ and 🎉 over several tokens: ids cut anywhere give the same message."""
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (
        "<think>Snow ☃ or 🎉?</think>\n\nCalling.<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nZürich 🎉\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    )
    ids = tok.encode(text, add_special_tokens=False).ids
    parsing = OutputParsing(reasoning=True, tools=TOOLS, parser="mimo")

    def through(splits: list[list[int]]) -> tuple[ParsedMessage, int]:
        text_stream = ChoiceText(_Tok(tok), (), frozenset(), False)
        out = parsing.start()
        pieces: list[Piece] = []
        for part in splits:
            pieces += out.feed(text_stream.push(part, []).text)
        pieces += out.feed(text_stream.finish()) + out.finish()
        end = out.reasoning_end
        assert end is not None
        return collect(pieces), text_stream.tokens_through(end)

    whole, reasoning_tokens = through([ids])
    assert whole.reasoning == "Snow ☃ or 🎉?" and whole.content == "Calling."
    assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == [
        ("get_weather", {"city": "Zürich 🎉", "days": 2})
    ]
    # reasoning tokens: the fewest ids whose text holds the reasoning and its end tag
    assert "</think>" in tok.decode(ids[:reasoning_tokens]) and "</think>" not in tok.decode(
        ids[: reasoning_tokens - 1]
    )
    for i in range(len(ids) + 1):
        assert through([ids[:i], ids[i:]]) == (whole, reasoning_tokens)
    assert through([[t] for t in ids]) == (whole, reasoning_tokens)
