"""The part every tool-call format shares: finding `<tool_call>` ... `</tool_call>` blocks in content.

    content ... <tool_call> BODY </tool_call> content ...
                ^ a subclass reads BODY (its own format) and emits the call, or gives the block
                  back as text: an unknown function name, a body that is not a call

Text that could be the start of `<tool_call>` is held back until it is known not to be. Once a
call's name is out, the call cannot be taken back: a malformed rest is read leniently (stray text
dropped, a missing closing tag implied) and, at the end of the output, the call is closed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from services.router.toolcalls.pieces import Piece, held_prefix

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

ToolSchemas = Mapping[str, Mapping[str, Any]]  # function name -> its `parameters` JSON schema


class ToolCallParser:
    """Incremental: `feed` text as it comes, `finish` at the end; a one-shot parse is one feed + finish."""

    name: ClassVar[str]

    def __init__(self, tools: ToolSchemas, max_calls: int | None = None) -> None:
        self._tools = tools
        self._max_calls = max_calls
        self._buf = ""  # text fed and not yet consumed
        self._raw = ""  # the open block as the model wrote it, given back as text if it is no call
        self._in_block = False
        self._passthrough = False  # inside a block given back as text: until its </tool_call>
        self._index = -1  # the open call's index
        self._after_call = False  # whitespace right after a call is the format's, not content
        self._scanned: dict[str, int] = {}  # tag -> where a search for it resumes (see _find)
        self._waiting: str | None = None  # no progress until this tag arrives (see _wait_for)
        self._seam = ""  # the last characters seen while waiting: a tag may straddle two feeds
        self._parked: list[str] = []  # text fed while waiting, not yet in _buf
        self.calls = 0

    def feed(self, text: str) -> list[Piece]:
        if self._waiting is not None:
            seam = self._seam + text
            if self._waiting not in seam:  # a long value streaming in: park it, scan only the seam
                self._parked.append(text)
                self._seam = seam[max(0, len(seam) - len(self._waiting) + 1) :]
                return []
        self._unpark(text)
        out: list[Piece] = []
        self._run(out, final=False)
        return out

    def finish(self) -> list[Piece]:
        self._unpark("")
        out: list[Piece] = []
        self._run(out, final=True)
        return out

    def _unpark(self, text: str) -> None:
        self._buf = "".join((self._buf, *self._parked, text))
        self._parked.clear()
        self._waiting = None

    def parse(self, text: str) -> list[Piece]:
        """The one-shot parse: the same code, fed once."""
        return [*self.feed(text), *self.finish()]

    # subclass: read the open block's body from self._buf; True while it made progress
    def _body(self, out: list[Piece], final: bool) -> bool:
        raise NotImplementedError

    def _start_block(self) -> None:
        """A new block opened (reset the subclass's per-block state)."""

    def _run(self, out: list[Piece], final: bool) -> None:
        while True:
            if self._passthrough:
                progressed = self._pass_through(out, final)
            elif self._in_block:
                progressed = self._body(out, final)
            else:
                progressed = self._outside(out, final)
            if not progressed:
                return

    def _outside(self, out: list[Piece], final: bool) -> bool:
        if self._after_call:
            rest = self._buf.lstrip()
            if not rest or (not final and CALL_OPEN.startswith(rest)):
                if final:
                    self._consume(len(self._buf))
                return False
            if rest.startswith(CALL_OPEN):
                self._consume(len(self._buf) - len(rest))
            self._after_call = False
        buf = self._buf
        if self._max_calls is not None and self.calls >= self._max_calls:
            self._content(out, len(buf))
            return False
        at = buf.find(CALL_OPEN)
        if at >= 0:
            self._content(out, at)
            self._consume(len(CALL_OPEN))
            self._raw, self._in_block = CALL_OPEN, True
            self._start_block()
            return True
        self._content(out, len(buf) - (0 if final else held_prefix(buf, CALL_OPEN)))
        return False

    def _pass_through(self, out: list[Piece], final: bool) -> bool:
        at = self._buf.find(CALL_CLOSE)
        if at >= 0:
            self._content(out, at + len(CALL_CLOSE))
            self._passthrough = False
            return True
        self._content(out, len(self._buf) - (0 if final else held_prefix(self._buf, CALL_CLOSE)))
        return False

    def _content(self, out: list[Piece], n: int) -> None:
        if n > 0:
            out.append(Piece("content", self._buf[:n]))
            self._consume(n)

    def _consume(self, n: int) -> None:
        self._buf = self._buf[n:]
        self._scanned.clear()

    # helpers for subclasses
    def _take(self, n: int) -> str:
        """Consume n characters of the block's body."""
        taken = self._buf[:n]
        self._consume(n)
        self._raw += taken
        return taken

    def _wait_for(self, tag: str) -> bool:
        """The open block can go on only once `tag` arrives: later feeds are parked until then
        (returns False, for `_body` to return)."""
        self._waiting, self._seam = tag, self._buf[max(0, len(self._buf) - len(tag) + 1) :]
        return False

    def _find(self, tag: str, start: int = 0) -> int:
        """`self._buf.find(tag, start)`, resuming where the last search for `tag` gave up while the
        buffer only grew: a long value waiting for its closing tag is scanned once, not per feed."""
        at = self._buf.find(tag, max(start, self._scanned.get(tag, 0)))
        if at < 0:
            self._scanned[tag] = max(start, len(self._buf) - len(tag) + 1, 0)
        return at

    def _give_back(self, out: list[Piece], until_close: bool) -> None:
        """The block is no call: what it said so far is text (and, `until_close`, the rest up to
        its </tool_call>)."""
        out.append(Piece("content", self._raw))
        self._raw, self._in_block, self._passthrough = "", False, until_close

    def _open_call(self, out: list[Piece], name: str) -> None:
        self._index = self.calls
        self.calls += 1
        out.append(Piece("call", name, self._index))

    def _args(self, out: list[Piece], text: str) -> None:
        out.append(Piece("args", text, self._index))

    def _end_block(self) -> None:
        """The open block was a call, and it is over."""
        self._raw, self._in_block, self._after_call = "", False, True
