"""The chat template renderer matches transformers' apply_chat_template, and template failures are 400s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.common.chat_template import ChatTemplate, TemplateError
from services.router.errors import InvalidRequest
from services.router.openai_schema import ChatMessage
from services.router.tokenization import RouterTokenizer, template_messages

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "ünïcode ☃"},
    ],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_text_as_transformers(model_dir: Path, messages: list[dict[str, str]]) -> None:
    from transformers import AutoTokenizer  # the independent reference (tests only: the router has no torch)

    tok = RouterTokenizer(model_dir)
    assert tok.template is not None
    reference = AutoTokenizer.from_pretrained(str(model_dir))
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.template.render(messages) == expected


def test_smollm2_prompt_shape(model_dir: Path) -> None:
    tok = RouterTokenizer(model_dir)
    ids = tok.chat_prompt([ChatMessage(role="user", content="Hi")])
    text = tok._tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert ids.count(tok._tok.token_to_id("<|im_start|>")) == 3  # specials are single tokens


def test_text_parts_are_joined_and_others_refused() -> None:
    m = ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert template_messages([m])[0]["content"] == "ab"
    with pytest.raises(InvalidRequest) as e:
        template_messages([m, ChatMessage(role="user", content=[{"type": "input_audio"}])])
    assert e.value.param == "messages[1].content[0]"


def test_raise_exception_and_named_templates() -> None:
    cfg = {
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {
                "name": "default",
                "template": "{% if messages|length > 1 %}{{ raise_exception('one only') }}{% endif %}"
                "{{ bos_token }}{{ messages[0]['content'] | tojson }}",
            },
        ],
        "bos_token": {"content": "<s>"},
    }
    tmpl = ChatTemplate.from_tokenizer_config(cfg)
    assert tmpl is not None
    assert tmpl.render([{"role": "user", "content": "☃"}]) == "<s>" + json.dumps("☃", ensure_ascii=False)
    with pytest.raises(TemplateError, match="one only"):
        tmpl.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert ChatTemplate.from_tokenizer_config({}) is None
