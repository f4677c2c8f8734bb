"""What the output parsers emit: pieces of an assistant message, in the order the model wrote them.

    Piece("content", text)          text the client sees as `content`
    Piece("reasoning", text)        text between <think> and </think>: `reasoning_content`
    Piece("call", name, index)      tool call `index` starts, calling `name`
    Piece("args", json, index)      the next piece of call `index`'s arguments (a JSON object's text)

A stream of pieces, merged by `collect`, is the whole message; a parser fed the output in any
chunking yields pieces that collect to the same message as one feed of the whole output.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

PieceKind = Literal["content", "reasoning", "call", "args"]


@dataclass(frozen=True)
class Piece:
    kind: PieceKind
    text: str
    index: int = -1  # the tool call's index, for "call" and "args"


@dataclass
class ParsedCall:
    name: str
    arguments: str = ""


@dataclass
class ParsedMessage:
    content: str = ""
    reasoning: str = ""
    calls: list[ParsedCall] = field(default_factory=list)

    def add(self, piece: Piece) -> None:
        if piece.kind == "content":
            self.content += piece.text
        elif piece.kind == "reasoning":
            self.reasoning += piece.text
        elif piece.kind == "call":
            assert piece.index == len(self.calls), "tool calls start in index order"
            self.calls.append(ParsedCall(piece.text))
        else:
            self.calls[piece.index].arguments += piece.text


def collect(pieces: Iterable[Piece]) -> ParsedMessage:
    msg = ParsedMessage()
    for p in pieces:
        msg.add(p)
    return msg


def merged(pieces: Iterable[Piece]) -> list[Piece]:
    """Adjacent text pieces of one kind (and argument pieces of one call) joined; empty text dropped."""
    out: list[Piece] = []
    for p in pieces:
        if not p.text and p.kind != "call":
            continue
        if out and p.kind != "call" and out[-1].kind == p.kind and out[-1].index == p.index:
            out[-1] = Piece(p.kind, out[-1].text + p.text, p.index)
        else:
            out.append(p)
    return out


def held_prefix(text: str, tag: str) -> int:
    """The length of the longest suffix of `text` that is a proper prefix of `tag` (what to hold back)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
