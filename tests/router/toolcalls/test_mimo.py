"""MiMo's XML tool calls: golden outputs, whole and streamed at every cut."""

from __future__ import annotations

import pytest

from services.router.toolcalls.mimo import MimoToolParser
from tests.router.toolcalls.golden import TOOLS, Case, calls_out_before_the_end, every_split, expected, run


def call(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CASES = [
    Case(
        "plain text", "Hello, world. 1 < 2 and <b>bold</b>.", content="Hello, world. 1 < 2 and <b>bold</b>."
    ),
    Case(
        "one call, typed values",
        call("get_weather", ("city", "Paris"), ("days", "3"), ("metric", "True"), ("ratio", "0.5")),
        calls=(("get_weather", {"city": "Paris", "days": 3, "metric": True, "ratio": 0.5}),),
    ),
    Case(
        "text before, two parallel calls",
        "Let me check.\n" + call("get_weather", ("city", "Oslo")) + "\n" + call("search"),
        content="Let me check.\n",
        calls=(("get_weather", {"city": "Oslo"}), ("search", {})),
        raw_arguments=('{"city": "Oslo"}', "{}"),
    ),
    Case(
        "arrays, objects, null, and a number that stays text",
        call(
            "get_weather",
            ("tags", '["a", "b"]'),
            ("where", '{"lat": 1.5}'),
            ("note", "null"),
            ("days", "three"),
        ),
        calls=(("get_weather", {"tags": ["a", "b"], "where": {"lat": 1.5}, "note": None, "days": "three"}),),
    ),
    Case(
        "a string keeps inner newlines and markup; an undeclared parameter is a string",
        call("get_weather", ("city", "line 1\n<b>line 2</b>\n"), ("extra", "42")),
        calls=(("get_weather", {"city": "line 1\n<b>line 2</b>\n", "extra": "42"}),),
    ),
    Case(
        "unknown function: the block is text, the rest is parsed",
        call("launch_rockets", ("n", "3")) + call("search"),
        content=call("launch_rockets", ("n", "3")),
        calls=(("search", {}),),
    ),
    Case(
        "not a function inside the block: text",
        "<tool_call>\nhello</tool_call> after",
        content="<tool_call>\nhello</tool_call> after",
    ),
    Case(
        "cut short inside a value: the call is closed with what was said",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar",
        calls=(("get_weather", {"city": "Par"}),),
    ),
    Case(
        "cut short before the name is known: text",
        "ok <tool_call>\n<function=get_wea",
        content="ok <tool_call>\n<function=get_wea",
    ),
    Case("a partial opening tag at the end is text", "see <tool_ca", content="see <tool_ca"),
    Case(
        "missing </function>, stray text dropped, unicode",
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nZürich ☃ 🎉\n</parameter>\nstray\n</tool_call>",
        calls=(("get_weather", {"city": "Zürich ☃ 🎉"}),),
    ),
    Case(
        "a repeated parameter keeps its first value",
        call("get_weather", ("city", "A"), ("city", "B")),
        calls=(("get_weather", {"city": "A"}),),
    ),
    Case(
        "whitespace between calls and at the end is the format's; text after a call is content",
        call("search") + "\n\n" + call("search") + "\n Done.\n",
        content="\n Done.\n",
        calls=(("search", {}), ("search", {})),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_golden_whole_and_cut_everywhere(case: Case) -> None:
    want = expected(case)
    for chunks in every_split(case.text):
        assert run(lambda: MimoToolParser(TOOLS), chunks) == want, chunks


def test_arguments_stream_one_parameter_at_a_time() -> None:
    parser = MimoToolParser(TOOLS)
    pieces = parser.feed("<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n")
    assert [(p.kind, p.text) for p in pieces] == [("call", "get_weather"), ("args", '{"city": "Rome"')]
    pieces = parser.feed("<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>")
    assert [(p.kind, p.text) for p in pieces] == [("args", ', "days": 2'), ("args", "}")]
    assert parser.finish() == [] and parser.calls == 1


def test_max_calls_leaves_later_blocks_as_text() -> None:
    text = call("search") + call("search")
    got = run(lambda: MimoToolParser(TOOLS, max_calls=1), [text])
    assert [c.name for c in got.calls] == ["search"] and got.content == call("search")


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.calls and c.text.endswith("</tool_call>")], ids=lambda c: c.name
)
def test_calls_are_out_before_the_end(case: Case) -> None:
    calls_out_before_the_end(lambda: MimoToolParser(TOOLS), case)
