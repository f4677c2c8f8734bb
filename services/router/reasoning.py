"""Reasoning text (`<think>` ... `</think>`) apart from the answer, incrementally.

    [<think>] reasoning </think> answer
     ^ written by the template (the prompt ends with it: `in_reasoning`) or by the model as the
       first thing it says (leading whitespace allowed); anything else first means no reasoning

Whitespace around the reasoning, and before the answer, is the format's: reasoning_content and
content come without it. An output cut short inside the reasoning is all reasoning. `end_offset`
is where, in the text fed, the reasoning ended (after `</think>`): the router counts the tokens
up to there as reasoning tokens.
"""

from __future__ import annotations

from services.router.toolcalls.pieces import Piece, held_prefix

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class ReasoningParser:
    def __init__(self, in_reasoning: bool) -> None:
        self._state = "reasoning" if in_reasoning else "start"  # start -> reasoning -> answer_start -> answer
        self._buf = ""
        self._fed = 0  # characters fed so far
        self._started = False  # reasoning text emitted (leading whitespace is behind us)
        self.saw_reasoning = in_reasoning
        self.end_offset: int | None = None

    def feed(self, text: str) -> list[Piece]:
        self._buf += text
        self._fed += len(text)
        out: list[Piece] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Piece]:
        out: list[Piece] = []
        while self._step(out, final=True):
            pass
        return out

    def parse(self, text: str) -> list[Piece]:
        return [*self.feed(text), *self.finish()]

    def _step(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._state == "start":
            rest = buf.lstrip()
            if rest.startswith(THINK_OPEN):
                self._buf = rest[len(THINK_OPEN) :]
                self._state, self.saw_reasoning = "reasoning", True
                return True
            if not final and THINK_OPEN.startswith(rest):
                return False
            self._state = "answer"
            return True
        if self._state == "reasoning":
            return self._reasoning(out, final)
        if self._state == "answer_start":
            rest = buf.lstrip()
            if not rest:
                self._buf = ""
                return False
            self._buf, self._state = rest, "answer"
            return True
        out.append(Piece("content", buf))
        self._buf = ""
        return False

    def _reasoning(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        if not self._started:
            buf = self._buf = buf.lstrip()
            if not buf:
                return False
        at = buf.find(THINK_CLOSE)
        if at >= 0:
            self._emit(out, buf[:at].rstrip())
            self._buf = buf[at + len(THINK_CLOSE) :]
            self.end_offset = self._fed - len(self._buf)
            self._state = "answer_start"
            return True
        if final:
            self._emit(out, buf.rstrip())
            self._buf = ""
            return False
        keep = held_prefix(buf, THINK_CLOSE)
        body = buf[: len(buf) - keep]
        sure = body.rstrip()  # trailing whitespace waits: it is the format's if </think> follows
        self._emit(out, sure)
        self._buf = buf[len(sure) :]
        return False

    def _emit(self, out: list[Piece], text: str) -> None:
        if text:
            out.append(Piece("reasoning", text))
            self._started = True
