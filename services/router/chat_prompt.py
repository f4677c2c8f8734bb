"""A chat request as the model's prompt, and how its answer is to be read.

The model's chat template renders the messages, the tools and the template kwargs
(`enable_thinking`, ...). History turns keep their structure: an assistant turn's tool calls go to
the template with their arguments as objects (templates iterate or `tojson` them), a tool turn
with its `tool_call_id`. The answer is read as reasoning + content when the template thinks, and
for tool calls (the model's parser) when the request has tools and `tool_choice` is not "none".

`tool_choice` "required" or a named function is rendered and read like "auto": nothing makes the
model call a tool yet (that is grammar-constrained decoding, with structured outputs); an answer
without a valid call comes back as the text it is.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from services.common.chat_template import ChatTemplate, TemplateError
from services.router.assistant import OutputParsing
from services.router.errors import InvalidRequest
from services.router.openai_schema import ChatCompletionRequest
from services.router.reasoning import THINK_OPEN
from services.router.settings import RouterSettings
from services.router.tokenization import RouterTokenizer, template_messages
from services.router.toolcalls import choose_parser


def chat_prompt(
    req: ChatCompletionRequest, tok: RouterTokenizer, settings: RouterSettings
) -> tuple[list[int], OutputParsing | None]:
    template = tok.template
    if template is None:
        raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
    tools = [t.model_dump(exclude_none=True) for t in req.tools or ()]
    if tools and not template.takes_tools:
        raise InvalidRequest(
            "this model's chat template does not render tools, so the model would never see them",
            param="tools",
        )
    try:
        text = template.render(_messages(req), tools=tools or None, **req.template_kwargs)
    except TemplateError as e:
        raise InvalidRequest(str(e), param="messages") from None
    # The template writes the special tokens itself (bos, role markers).
    ids = tok.encode(text, add_special_tokens=False)
    return ids, output_parsing(req, template, text, settings)


def output_parsing(
    req: ChatCompletionRequest, template: ChatTemplate, prompt_text: str, settings: RouterSettings
) -> OutputParsing | None:
    reasoning = template.thinks and req.separate_reasoning
    calls = bool(req.tools) and req.tool_choice != "none"
    if not reasoning and not calls:
        return None
    return OutputParsing(
        reasoning=reasoning,
        in_reasoning=reasoning and prompt_text.rstrip().endswith(THINK_OPEN),
        tools={t.function.name: t.function.parameters or {} for t in req.tools or ()} if calls else None,
        parser=tool_call_parser(settings.tool_call_parser, settings.model_dir, template.source),
        max_calls=1 if req.parallel_tool_calls is False else None,
    )


@lru_cache(maxsize=8)
def tool_call_parser(setting: str, model_dir: Path, template_source: str) -> str:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return choose_parser(setting, template_source, config if isinstance(config, dict) else {})


def _messages(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    out = template_messages(req.messages)
    for m in out:
        for call in m.get("tool_calls") or ():
            fn = call["function"]
            fn["arguments"] = json.loads(fn["arguments"])  # validated: a JSON object
    return out
