"""MiMo's tool calls (the Qwen3-Coder XML format), one `<tool_call>` block per call:

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Arguments stream one parameter at a time, each value read by the tool's schema (values.py); the
pieces add up to `json.dumps(arguments)`. Whitespace between tags is the format's; other stray
text inside a call is dropped. A function the request's tools do not name gives the block back as text.
"""

from __future__ import annotations

import json
import re
from typing import Any

from services.router.toolcalls.base import CALL_CLOSE, ToolCallParser
from services.router.toolcalls.pieces import Piece, held_prefix
from services.router.toolcalls.values import parameter_value

FUNCTION_OPEN = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER_OPEN = "<parameter="
PARAMETER_CLOSE = "</parameter>"
MAX_NAME = 256  # a `<function=` longer than this without its `>` is not a call
_SPACE = re.compile(r"\s*")


class MimoToolParser(ToolCallParser):
    name = "mimo"

    def _start_block(self) -> None:
        self._state = "head"  # head -> params -> tail
        self._seen: set[str] = set()
        self._call_name = ""

    def _body(self, out: list[Piece], final: bool) -> bool:
        if self._state == "head":
            return self._head(out, final)
        if self._state == "params":
            return self._params(out, final)
        return self._tail(out, final)

    def _head(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        ws = _spaces(buf)
        if buf.startswith(FUNCTION_OPEN, ws):
            end = buf.find(">", ws, ws + len(FUNCTION_OPEN) + MAX_NAME)
            if end < 0 and not final and len(buf) - ws <= len(FUNCTION_OPEN) + MAX_NAME:
                return False
            if end < 0:
                self._take(len(buf))
                self._give_back(out, until_close=True)
                return True
            name = buf[ws + len(FUNCTION_OPEN) : end].strip()
            self._take(end + 1)
            if name not in self._tools:
                self._give_back(out, until_close=True)
                return True
            self._open_call(out, name)
            self._state = "params"
            return True
        if FUNCTION_OPEN.startswith(buf[ws:]) and not final:
            return False
        self._give_back(out, until_close=True)
        return True

    def _params(self, out: list[Piece], final: bool) -> bool:
        buf = self._buf
        ws = _spaces(buf)
        if buf.startswith(PARAMETER_OPEN, ws):
            gt = self._find(">", ws)
            close = self._find(PARAMETER_CLOSE, gt + 1) if gt >= 0 else -1
            if close < 0 and not final:
                return self._wait_for(PARAMETER_CLOSE) if gt >= 0 else False
            if gt >= 0:  # at the end of the output, a value cut short is what the model said
                key = buf[ws + len(PARAMETER_OPEN) : gt].strip()
                self._parameter(out, key, buf[gt + 1 : close] if close >= 0 else buf[gt + 1 :])
            self._take(close + len(PARAMETER_CLOSE) if close >= 0 else len(buf))
            return True
        for tag in (FUNCTION_CLOSE, CALL_CLOSE):
            if buf.startswith(tag, ws):
                self._take(ws + len(tag))
                self._close_arguments(out)
                if tag == CALL_CLOSE:
                    self._end_block()
                else:
                    self._state = "tail"
                return True
        rest = buf[ws : ws + len(PARAMETER_OPEN)]  # enough to tell a tag's start
        if ws == len(buf) or (
            not final and any(t.startswith(rest) for t in (PARAMETER_OPEN, FUNCTION_CLOSE, CALL_CLOSE))
        ):
            if final:
                self._close_arguments(out)
                self._end_block()
                return True
            return False
        nxt = buf.find("<", ws + 1)  # stray text: dropped up to the next tag
        self._take(nxt if nxt >= 0 else len(buf))
        return True

    def _tail(self, out: list[Piece], final: bool) -> bool:
        at = self._buf.find(CALL_CLOSE)
        if at >= 0 or final:
            self._take(at + len(CALL_CLOSE) if at >= 0 else len(self._buf))
            self._end_block()
            return True
        self._take(len(self._buf) - held_prefix(self._buf, CALL_CLOSE))
        return False

    def _parameter(self, out: list[Piece], key: str, raw: str) -> None:
        if not key or key in self._seen:
            return
        schema = self._tools[self._call_name].get("properties", {})
        value: Any = parameter_value(raw, schema.get(key) if isinstance(schema, dict) else None)
        lead = ", " if self._seen else "{"
        self._seen.add(key)
        self._args(out, f"{lead}{_dumps(key)}: {_dumps(value)}")

    def _close_arguments(self, out: list[Piece]) -> None:
        if self._state == "params":
            self._args(out, "}" if self._seen else "{}")
            self._state = "tail"

    def _open_call(self, out: list[Piece], name: str) -> None:
        super()._open_call(out, name)
        self._call_name = name


def _spaces(buf: str) -> int:
    """Leading whitespace of `buf` (without copying it)."""
    match = _SPACE.match(buf)
    return match.end() if match else 0


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
