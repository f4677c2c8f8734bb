"""One chat choice's text as an assistant message: reasoning, content and tool calls, incrementally.

    text --ReasoningParser--> reasoning | content --ToolCallParser--> content | tool calls

Set per request (`OutputParsing`, built from the request and the model's template in
chat_prompt.py); None for a plain text answer. Tool calls are read only in the answer, never in
the reasoning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.router.reasoning import ReasoningParser
from services.router.toolcalls import PARSERS
from services.router.toolcalls.pieces import Piece, merged


@dataclass(frozen=True)
class OutputParsing:
    reasoning: bool = False  # the template thinks: separate <think> ... </think>
    in_reasoning: bool = False  # the prompt ends inside <think> (the template opened it)
    tools: Mapping[str, Mapping[str, Any]] | None = None  # name -> parameters schema; None: no calls
    parser: str = "hermes"
    max_calls: int | None = None  # 1 when parallel_tool_calls is false

    def start(self) -> AssistantOutput:
        return AssistantOutput(self)


class AssistantOutput:
    def __init__(self, parsing: OutputParsing) -> None:
        self.reasoning = ReasoningParser(parsing.in_reasoning) if parsing.reasoning else None
        self.tools = (
            PARSERS[parsing.parser](parsing.tools, parsing.max_calls) if parsing.tools is not None else None
        )

    @property
    def called(self) -> bool:
        return self.tools is not None and self.tools.calls > 0

    @property
    def reasoning_end(self) -> int | None:
        """Characters of the text up to the end of the reasoning; None: no reasoning, or not ended."""
        return self.reasoning.end_offset if self.reasoning is not None else None

    @property
    def saw_reasoning(self) -> bool:
        return self.reasoning is not None and self.reasoning.saw_reasoning

    def feed(self, text: str) -> list[Piece]:
        return self._through_tools(self.reasoning.feed(text) if self.reasoning else [Piece("content", text)])

    def finish(self) -> list[Piece]:
        out = self._through_tools(self.reasoning.finish() if self.reasoning else [])
        return merged([*out, *(self.tools.finish() if self.tools else [])])

    def parse(self, text: str) -> list[Piece]:
        return merged([*self.feed(text), *self.finish()])

    def _through_tools(self, pieces: list[Piece]) -> list[Piece]:
        if self.tools is None:
            return merged(pieces)
        out: list[Piece] = []
        for p in pieces:
            out += self.tools.feed(p.text) if p.kind == "content" else [p]
        return merged(out)
