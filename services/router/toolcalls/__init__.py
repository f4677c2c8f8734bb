"""Tool-call parsers: the model's text -> OpenAI tool calls, incrementally (pieces.py says what comes out).

    mimo     MiMo-V2 / Qwen3-Coder XML:  <tool_call><function=NAME><parameter=ARG>VALUE</parameter>...
    hermes   JSON in <tool_call>:         <tool_call>{"name": ..., "arguments": {...}}</tool_call>

A new format is one ToolCallParser subclass and one line in PARSERS. `auto` picks by the model's
chat template (a template that writes `<function=` is MiMo's format), then its config (a MiMo
architecture), else hermes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.router.toolcalls.base import ToolCallParser, ToolSchemas
from services.router.toolcalls.hermes import HermesToolParser
from services.router.toolcalls.mimo import MimoToolParser

PARSERS: dict[str, type[ToolCallParser]] = {"mimo": MimoToolParser, "hermes": HermesToolParser}
PARSER_CHOICES = ("auto", *PARSERS)


def choose_parser(setting: str, template_source: str, model_config: Mapping[str, Any]) -> str:
    """The parser name for `--tool-call-parser setting` (auto: from the template, then the config)."""
    if setting != "auto":
        if setting not in PARSERS:
            raise ValueError(f"unknown tool-call parser {setting!r} (one of {', '.join(PARSER_CHOICES)})")
        return setting
    if "<function=" in template_source:
        return "mimo"
    if "<tool_call>" in template_source:
        return "hermes"
    arch = " ".join(str(a) for a in model_config.get("architectures") or ())
    if "mimo" in f"{model_config.get('model_type', '')} {arch}".lower():
        return "mimo"
    return "hermes"


__all__ = ["PARSERS", "PARSER_CHOICES", "ToolCallParser", "ToolSchemas", "choose_parser"]
