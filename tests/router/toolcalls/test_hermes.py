"""Hermes-style JSON tool calls: golden outputs, whole and streamed at every cut."""

from __future__ import annotations

import json

import pytest

from services.router.toolcalls.hermes import HermesToolParser
from tests.router.toolcalls.golden import TOOLS, Case, calls_out_before_the_end, every_split, expected, run


def call(name: str, args: object, key: str = "arguments") -> str:
    return f"<tool_call>\n{json.dumps({'name': name, key: args}, ensure_ascii=False)}\n</tool_call>"


CASES = [
    Case("plain text", 'No tools needed: {"a": 1}.', content='No tools needed: {"a": 1}.'),
    Case(
        "one call",
        call("get_weather", {"city": "Paris", "days": 3}),
        calls=(("get_weather", {"city": "Paris", "days": 3}),),
    ),
    Case(
        "text, two calls, unicode",
        "Checking ☃.\n" + call("get_weather", {"city": "Zürich"}) + "\n" + call("search", {}),
        content="Checking ☃.\n",
        calls=(("get_weather", {"city": "Zürich"}), ("search", {})),
    ),
    Case(
        "arguments as a JSON string, or named parameters",
        call("get_weather", json.dumps({"city": "Oslo"})) + call("search", {"q": "x"}, key="parameters"),
        calls=(("get_weather", {"city": "Oslo"}), ("search", {"q": "x"})),
    ),
    Case(
        "unknown function: text",
        call("launch_rockets", {"n": 3}) + " ok",
        content=call("launch_rockets", {"n": 3}) + " ok",
    ),
    Case(
        "not JSON: text",
        "<tool_call>\n{name: get_weather}\n</tool_call>",
        content="<tool_call>\n{name: get_weather}\n</tool_call>",
    ),
    Case(
        "arguments not an object: text",
        call("search", [1, 2]),
        content=call("search", [1, 2]),
    ),
    Case(
        "no closing tag, but the JSON is whole: a call",
        '<tool_call>\n{"name": "search", "arguments": {"q": "a"}}',
        calls=(("search", {"q": "a"}),),
    ),
    Case(
        "cut short inside the JSON: text",
        '<tool_call>\n{"name": "search", "argu',
        content='<tool_call>\n{"name": "search", "argu',
    ),
    Case("a partial opening tag at the end is text", "see <tool_", content="see <tool_"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_whole_and_cut_everywhere(case: Case) -> None:
    want = expected(case)
    for chunks in every_split(case.text):
        assert run(lambda: HermesToolParser(TOOLS), chunks) == want, chunks


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.calls and c.text.endswith("</tool_call>")], ids=lambda c: c.name
)
def test_calls_are_out_before_the_end(case: Case) -> None:
    calls_out_before_the_end(lambda: HermesToolParser(TOOLS), case)
