"""Golden outputs of the parsers: model text -> the message it is (content, reasoning, tool calls),
and the helpers that feed a parser whole, cut in two at every character, or one character at a time."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.router.toolcalls.pieces import ParsedCall, ParsedMessage, Piece, collect

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
        "ratio": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {"type": "object"},
        "note": {"type": ["string", "null"]},
    },
}
TOOLS: dict[str, dict[str, Any]] = {"get_weather": WEATHER, "search": {"type": "object", "properties": {}}}


class Parser(Protocol):
    def feed(self, text: str) -> list[Piece]: ...

    def finish(self) -> list[Piece]: ...


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    content: str = ""
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    reasoning: str = ""
    raw_arguments: tuple[str, ...] = field(default=())  # exact argument texts, where they matter


def expected(case: Case) -> ParsedMessage:
    calls = [ParsedCall(n, json.dumps(a, ensure_ascii=False)) for n, a in case.calls]
    for call, raw in zip(calls, case.raw_arguments, strict=False):
        call.arguments = raw
    return ParsedMessage(case.content, case.reasoning, calls)


def run(make: Callable[[], Parser], chunks: Sequence[str], finish: bool = True) -> ParsedMessage:
    parser = make()
    pieces: list[Piece] = []
    for c in chunks:
        pieces += parser.feed(c)
    if finish:
        pieces += parser.finish()
    return collect(pieces)


def calls_out_before_the_end(make: Callable[[], Parser], case: Case) -> None:
    """A text ending with a closed call: every call is out, whole, before `finish` (none waits for the end)."""
    want = expected(case).calls
    for chunks in every_split(case.text):
        assert run(make, chunks, finish=False).calls == want, chunks


def every_split(text: str) -> list[list[str]]:
    """The text whole, cut in two at every character boundary, and one character at a time."""
    return [[text], *([text[:i], text[i:]] for i in range(len(text) + 1)), list(text)]
