"""Tools and reasoning through a real local cluster (`swaserve up`: redis-server, router, prefill and
decode processes) with the official openai client. The model is mimo-tiny (random weights) with a
MiMo-style chat template that takes tools and opens <think> (tests/router/templates/mimo_tools.jinja):
random weights never write a tool call, so this checks the request surface end to end — tools and
a history with tool turns are accepted and reach the workers as the template renders them
(transformers renders the same template independently), streaming with tools works, and the
answer, inside the <think> the template opened, comes back as reasoning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from tokenizers import Tokenizer

from services.models.model_store import resolve_model
from tests.integration.up_cluster import swaserve_up
from tests.router.tool_models import with_template

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(
        resolve_model("mimo-tiny"), "mimo_tools", tmp_path_factory.mktemp("m") / "mimo-tools"
    )


@pytest.fixture(scope="module")
def client(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    log = tmp_path_factory.mktemp("cluster") / "up.log"
    with swaserve_up(log, "--model", str(model_dir), prefill_workers=1, timeout=900) as base:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)


def _reference_len(model_dir: Path, messages: list[dict[str, Any]]) -> int:
    from transformers import AutoTokenizer  # the independent renderer (tests only)

    hf = [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                             for c in m["tool_calls"]]} if m.get("tool_calls") else m
        for m in messages
    ]  # fmt: skip
    text = AutoTokenizer.from_pretrained(str(model_dir)).apply_chat_template(
        hf, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    return len(
        Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    )


def test_tools_and_tool_history_reach_the_workers_as_rendered(client: openai.OpenAI, model_dir: Path) -> None:
    model = client.models.list().data[0].id
    out = client.chat.completions.create(
        model=model, messages=HISTORY, tools=TOOLS, tool_choice="auto", max_tokens=6, temperature=0
    )
    assert out.usage is not None and out.usage.prompt_tokens == _reference_len(model_dir, HISTORY)
    msg = out.choices[0].message
    reasoning = (msg.model_extra or {}).get("reasoning_content")
    details = out.usage.completion_tokens_details
    assert details is not None and 0 < details.reasoning_tokens <= out.usage.completion_tokens
    if not msg.tool_calls:  # random weights: text, which the opened <think> makes reasoning
        assert reasoning or msg.content
        assert out.choices[0].finish_reason in ("length", "stop")


def test_streamed_with_tools_equals_whole(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    kw: dict[str, Any] = {
        "model": model,
        "messages": HISTORY,
        "tools": TOOLS,
        "max_tokens": 6,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kw).choices[0].message
    reasoning = content = ""
    for chunk in client.chat.completions.create(**kw, stream=True):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
    assert reasoning == ((whole.model_extra or {}).get("reasoning_content") or "")
    assert content == (whole.content or "")


def test_bad_tool_choice_is_a_400_and_thinking_off_is_accepted(client: openai.OpenAI) -> None:
    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=HISTORY, tools=TOOLS, tool_choice="sometimes")
    assert e.value.body["param"] == "tool_choice"  # type: ignore[index]
    out = client.chat.completions.create(
        model=model,
        messages=HISTORY[:1],
        max_tokens=4,
        temperature=0,
        extra_body={"thinking": {"type": "disabled"}},
    )
    assert out.usage is not None and out.usage.completion_tokens_details is not None
    assert out.usage.completion_tokens_details.reasoning_tokens == 0  # the template closed <think> itself
