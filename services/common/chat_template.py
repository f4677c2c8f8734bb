"""Chat templates (jinja2, sandboxed), rendered as Hugging Face renders them; no torch, no
transformers, so the router and `swaserve generate` share this one renderer.

The template comes from the model's tokenizer_config.json: `chat_template` is a string, or a list
of `{"name", "template"}` of which "default" is used. Besides the messages, a template may take
`tools` (OpenAI tool objects) and keyword arguments (`enable_thinking`, ...); what a template
takes is read from its source once (`takes_tools`, `thinks`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The template refused the messages (raise_exception) or failed to render them."""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
            variables = jinja2.meta.find_undeclared_variables(env.parse(source))
        except jinja2.TemplateError as e:
            raise TemplateError(f"the model's chat template does not compile: {e}") from None
        self.source = source
        self.takes_tools = "tools" in variables  # renders the request's tools
        self.thinks = "<think>" in source  # a reasoning model: its answers may open with <think>
        self._bos = bos_token
        self._eos = eos_token

    @classmethod
    def from_tokenizer_config(cls, cfg: dict[str, Any]) -> ChatTemplate | None:
        source = cfg.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str):
            return None
        return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """`kwargs`: more template variables (chat_template_kwargs); they cannot replace the ones named here."""
        try:
            return self._template.render(
                **kwargs,
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos,
                eos_token=self._eos,
            )
        except TemplateError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError) as e:
            raise TemplateError(
                f"the chat template cannot render these messages ({type(e).__name__})"
            ) from None


def _raise(message: str) -> None:
    raise TemplateError(f"chat template: {message}")


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return tok if isinstance(tok, str) else ""


def load_chat_template(model_dir: Path) -> ChatTemplate:
    """The chat template of a model directory; a ValueError if it has none."""
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{model_dir} has no tokenizer_config.json, so no chat template")
    template = ChatTemplate.from_tokenizer_config(json.loads(cfg_path.read_text()))
    if template is None:
        raise ValueError(f"{cfg_path} has no chat_template")
    return template
