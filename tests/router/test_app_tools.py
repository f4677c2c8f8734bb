"""Tool calls and reasoning through the router with the official openai client, against the FAKE
workers (fake_workers.py: their scripted replies are the test-only model output path). The model
directories carry test chat templates that take tools (tool_models.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tokenizers import Tokenizer

from services.common.prompt_wire import prompt_ids_of
from services.router.workers import StaticWorkerPool
from tests.router import fake_workers
from tests.router.conftest import MODEL, RouterServer, serve_router
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel
from tests.router.tool_models import with_template

REASONING = "The user wants the weather."
MIMO_CALLS = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
    "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=search>\n<parameter=q>\nParis ☃ hotels\n"
    "</parameter>\n</function>\n</tool_call>"
)
REPLIES = {
    "mimo_calls": f"{REASONING}\n</think>\n\n{MIMO_CALLS}",
    "mimo_unknown": f"{REASONING}\n</think>\n\n<tool_call>\n<function=launch>\n</function>\n</tool_call>",
    "hermes_calls": 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
    '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"q": "Paris ☃ hotels"}}\n</tool_call>',
}
WANT_CALLS = [("get_weather", {"city": "Paris", "days": 3}), ("search", {"q": "Paris ☃ hotels"})]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}},
]


@dataclass
class ToolCluster:
    routers: dict[str, RouterServer]
    prefill: FakePrefillWorker
    decode: FakeDecodeWorker
    model_dirs: dict[str, Path]
    tok: Tokenizer
    clients: dict[str, openai.OpenAI] = field(default_factory=dict)


@pytest.fixture(scope="module")
def tc(model_dir: Path, toy: ToyModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolCluster]:
    root = tmp_path_factory.mktemp("tool_models")
    dirs = {t: with_template(model_dir, f"{t}_tools", root / t) for t in ("mimo", "hermes")}
    prefill, decode = FakePrefillWorker(toy).start(), FakeDecodeWorker(toy).start()
    pool = StaticWorkerPool([prefill.addr], [decode.addr])
    routers = {t: serve_router(d, pool, max_context=4096) for t, d in dirs.items()}
    with pytest.MonkeyPatch.context() as mp:
        for key, reply in REPLIES.items():
            mp.setitem(fake_workers.REPLIES, key, reply)
        c = ToolCluster(routers, prefill, decode, dirs, toy.tok)
        c.clients = {t: r.client() for t, r in routers.items()}
        try:
            yield c
        finally:
            for r in routers.values():
                r.close()
            prefill.stop()
            decode.stop()
            decode.reset()


def ask(key: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": f"What is the weather in Paris? [{key}]"}]


def calls_of(message: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_mimo_calls_and_reasoning(tc: ToolCluster) -> None:
    out = tc.clients["mimo"].chat.completions.create(
        model=MODEL, messages=ask("mimo_calls"), tools=TOOLS, temperature=0
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert (choice.message.model_extra or {})["reasoning_content"] == REASONING
    assert calls_of(choice.message) == WANT_CALLS
    ids = [c.id for c in choice.message.tool_calls or ()]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert all(c.type == "function" for c in choice.message.tool_calls or ())
    # reasoning tokens: the fewest generated tokens whose text holds the reasoning and </think>
    generated = tc.tok.encode(REPLIES["mimo_calls"], add_special_tokens=False).ids
    n = out.usage.completion_tokens_details.reasoning_tokens  # type: ignore[union-attr]
    assert "</think>" in tc.tok.decode(generated[:n]) and "</think>" not in tc.tok.decode(generated[: n - 1])
    assert out.usage.completion_tokens == len(generated) + 1  # type: ignore[union-attr]


@dataclass
class Streamed:
    reasoning: str = ""
    content: str = ""
    calls: dict[int, dict[str, str]] = field(default_factory=dict)
    finish: str | None = None
    usage: Any = None


def stream(client: openai.OpenAI, **kw: Any) -> Streamed:
    s = Streamed()
    for chunk in client.chat.completions.create(
        model=MODEL, stream=True, stream_options={"include_usage": True}, **kw
    ):
        if chunk.usage is not None:
            s.usage = chunk.usage
        for ch in chunk.choices:
            d = ch.delta
            s.reasoning += (d.model_extra or {}).get("reasoning_content") or ""
            s.content += d.content or ""
            for tc in d.tool_calls or ():
                call = s.calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                if tc.id:
                    assert not call["id"], "a call's id comes once"
                    call["id"] = tc.id
                if tc.function and tc.function.name:
                    call["name"] += tc.function.name
                if tc.function and tc.function.arguments:
                    call["arguments"] += tc.function.arguments
            s.finish = ch.finish_reason or s.finish
    return s


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 200])
def test_mimo_stream_equals_the_whole_answer(tc: ToolCluster, chunk_size: int) -> None:
    """Multi-token chunks (MTP) carry the end of the reasoning and a call's start together."""
    tc.decode.chunk_size = chunk_size
    s = stream(tc.clients["mimo"], messages=ask("mimo_calls"), tools=TOOLS, temperature=0)
    assert s.reasoning == REASONING and s.content == "" and s.finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(s.calls.items())] == WANT_CALLS
    assert all(c["id"].startswith("call_") for c in s.calls.values())
    assert s.usage.completion_tokens_details.reasoning_tokens > 0


@pytest.mark.parametrize("chunk_size", [1, 3, 200])
def test_hermes_calls_whole_and_streamed(tc: ToolCluster, chunk_size: int) -> None:
    tc.decode.chunk_size = chunk_size
    client = tc.clients["hermes"]
    out = client.chat.completions.create(
        model=MODEL, messages=ask("hermes_calls"), tools=TOOLS, temperature=0
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls" and msg.content == "Sure.\n"
    assert calls_of(msg) == WANT_CALLS and "reasoning_content" not in (msg.model_extra or {})
    s = stream(client, messages=ask("hermes_calls"), tools=TOOLS, temperature=0)
    assert s.content == "Sure.\n" and s.reasoning == "" and s.finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for _, c in sorted(s.calls.items())] == WANT_CALLS


def test_unknown_function_is_text(tc: ToolCluster) -> None:
    out = tc.clients["mimo"].chat.completions.create(
        model=MODEL, messages=ask("mimo_unknown"), tools=TOOLS, temperature=0
    )
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "stop" and not msg.tool_calls
    assert msg.content == "<tool_call>\n<function=launch>\n</function>\n</tool_call>"


def test_tool_choice_none_parallel_false_and_reasoning_inline(tc: ToolCluster) -> None:
    client = tc.clients["mimo"]
    kw: dict[str, Any] = {"model": MODEL, "messages": ask("mimo_calls"), "tools": TOOLS, "temperature": 0}
    none = client.chat.completions.create(**kw, tool_choice="none").choices[0]
    assert none.finish_reason == "stop" and not none.message.tool_calls and none.message.content == MIMO_CALLS
    one = client.chat.completions.create(**kw, parallel_tool_calls=False).choices[0]
    assert calls_of(one.message) == WANT_CALLS[:1] and "<function=search>" in (one.message.content or "")
    named = client.chat.completions.create(
        **kw, tool_choice={"type": "function", "function": {"name": "search"}}
    )
    assert calls_of(named.choices[0].message) == WANT_CALLS  # accepted; not enforced (structured outputs)
    inline = client.chat.completions.create(**kw, extra_body={"separate_reasoning": False}).choices[0]
    assert inline.message.content == f"{REASONING}\n</think>\n\n" and calls_of(inline.message) == WANT_CALLS


HISTORY: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 2}'},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "snow ☃"},
]


def _reference_prompt(model_dir: Path, messages: list[dict[str, Any]], **kw: Any) -> list[int]:
    """The prompt as transformers renders the same template (history arguments as objects, as HF templates take them)."""
    from transformers import AutoTokenizer  # the independent renderer (tests only)

    hf = []
    for m in messages:
        m = {k: v for k, v in m.items() if v is not None}
        if "tool_calls" in m:
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        hf.append(m)
    text = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(
        hf, tokenize=False, add_generation_prompt=True, **kw
    )
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("template", ["mimo", "hermes"])
def test_history_and_tools_render_as_transformers_does(tc: ToolCluster, template: str) -> None:
    out = tc.clients[template].chat.completions.create(
        model=MODEL, messages=HISTORY, tools=TOOLS, temperature=0, max_tokens=4
    )
    sent = prompt_ids_of(tc.prefill.requests[-1])
    want = _reference_prompt(tc.model_dirs[template], HISTORY, tools=TOOLS)
    assert sent == want and out.usage.prompt_tokens == len(want)  # type: ignore[union-attr]
    text = tc.tok.decode(sent, skip_special_tokens=False)
    assert '"name": "get_weather"' in text and "snow ☃" in text  # the tools and the tool turn are in it


@pytest.mark.parametrize(
    "extra", [{"chat_template_kwargs": {"enable_thinking": False}}, {"thinking": {"type": "disabled"}}]
)
def test_thinking_off(tc: ToolCluster, extra: dict[str, Any]) -> None:
    tc.clients["mimo"].chat.completions.create(
        model=MODEL, messages=ask("x"), temperature=0, max_tokens=2, extra_body=extra
    )
    sent = prompt_ids_of(tc.prefill.requests[-1])
    assert sent == _reference_prompt(tc.model_dirs["mimo"], ask("x"), enable_thinking=False)
    assert tc.tok.decode(sent, skip_special_tokens=False).endswith("<think>\n\n</think>\n\n")


def test_plain_answer_with_a_thinking_template(tc: ToolCluster) -> None:
    """The template opened <think>, the reply never closes it: all of it is reasoning."""
    out = tc.clients["mimo"].chat.completions.create(model=MODEL, messages=ask("x"), temperature=0)
    msg = out.choices[0].message
    assert msg.content == "" and (msg.model_extra or {})["reasoning_content"] == fake_workers.DEFAULT_REPLY
    assert out.usage.completion_tokens_details.reasoning_tokens == out.usage.completion_tokens  # type: ignore[union-attr]


BAD = [
    ("tools not a list", {"tools": {"type": "function"}}, "tools"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    ("tool type", {"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ("function name", {"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ("duplicate names", {"tools": [TOOLS[1], TOOLS[1]]}, "tools"),
    ("unknown tool_choice", {"tools": TOOLS, "tool_choice": "always"}, "tool_choice"),
    ("tool_choice not an object", {"tools": TOOLS, "tool_choice": 3}, "tool_choice"),
    ("named function not in tools", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ("required without tools", {"tool_choice": "required"}, "tool_choice"),
    ("parallel_tool_calls type", {"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ("reserved template kwarg", {"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ("template kwargs type", {"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
    ("thinking type", {"thinking": {"type": "maybe"}}, "thinking.type"),
    ("thinking disagrees", {"thinking": {"type": "enabled"}, "chat_template_kwargs": {"enable_thinking": False}}, "thinking"),
    ("separate_reasoning type", {"separate_reasoning": 1}, "separate_reasoning"),
    ("tool turn without id", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ("tool_calls on a user turn", {"messages": [{"role": "user", "content": "x", "tool_calls": HISTORY[2]["tool_calls"]}]}, "messages[0]"),
    (
        "history arguments not JSON",
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
        "messages[0].tool_calls[0].function.arguments",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_400_naming_the_field(
    tc: ToolCluster, case: str, body: dict[str, Any], param: str
) -> None:
    with httpx.Client(base_url=tc.routers["mimo"].base_url, timeout=20) as http:
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ask("x"), **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err


def test_tools_for_a_template_without_tools_are_a_400(model_dir: Path, toy: ToyModel) -> None:
    """SmolLM2's own template never renders tools: the model would not see them, so say so."""
    router = serve_router(model_dir, StaticWorkerPool(["127.0.0.1:9"], ["127.0.0.1:9"]))
    try:
        with httpx.Client(base_url=router.base_url, timeout=20) as http:
            r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": ask("x"), "tools": TOOLS})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        assert "does not render tools" in r.json()["error"]["message"]
    finally:
        router.close()


@pytest.mark.parametrize("template", ["mimo", "hermes"])
def test_the_clients_stream_helper_accumulates_the_calls(tc: ToolCluster, template: str) -> None:
    """`client.chat.completions.stream` (what agent frameworks use) rebuilds the message from our deltas."""
    tc.decode.chunk_size = 3
    key = f"{template}_calls"
    with tc.clients[template].chat.completions.stream(
        model=MODEL, messages=ask(key), tools=TOOLS, temperature=0
    ) as s:
        names = [e.name for e in s if e.type == "tool_calls.function.arguments.done"]
        final = s.get_final_completion()
    assert names == [n for n, _ in WANT_CALLS]
    assert final.choices[0].finish_reason == "tool_calls" and calls_of(final.choices[0].message) == WANT_CALLS
