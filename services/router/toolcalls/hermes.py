"""Hermes-style tool calls (Qwen2.5, Hermes, many others): a JSON object in each `<tool_call>` block,

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}
    </tool_call>

A block is read whole once its `</tool_call>` arrived (or the output ended), so a call streams as
its name, then its arguments in one piece. `arguments` may also be a JSON string of the object
(some models write it so) or be named `parameters`. A block that is not such an object, or names
a function the request's tools do not have, comes back as text.
"""

from __future__ import annotations

import json
from typing import Any

from services.router.toolcalls.base import CALL_CLOSE, ToolCallParser
from services.router.toolcalls.pieces import Piece


class HermesToolParser(ToolCallParser):
    name = "hermes"

    def _body(self, out: list[Piece], final: bool) -> bool:
        at = self._find(CALL_CLOSE)
        if at < 0 and not final:
            return self._wait_for(CALL_CLOSE)
        body = self._take(at if at >= 0 else len(self._buf))
        if at >= 0:
            self._take(len(CALL_CLOSE))
        call = _call(body)
        if call is None or call[0] not in self._tools:
            self._give_back(out, until_close=False)
            return True
        self._open_call(out, call[0])
        self._args(out, json.dumps(call[1], ensure_ascii=False))
        self._end_block()
        return True


def _call(body: str) -> tuple[str, dict[str, Any]] | None:
    try:
        obj = json.loads(body, parse_constant=_no_constant)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args, parse_constant=_no_constant)
        except ValueError:
            return None
    return (obj["name"], args) if isinstance(args, dict) else None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
