"""Chat templates from tokenizer_config.json, rendered with jinja2 (no transformers at serve time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


def load_chat_template(model_dir: Path) -> tuple[str, dict[str, Any]]:
    cfg_path = model_dir / "tokenizer_config.json"
    if not cfg_path.exists():
        raise ValueError(f"{model_dir} has no tokenizer_config.json, so no chat template")
    cfg = json.loads(cfg_path.read_text())
    template = cfg.get("chat_template")
    if not isinstance(template, str):
        raise ValueError(f"{cfg_path} has no chat_template")
    return template, cfg


def render_chat(model_dir: Path, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    template, cfg = load_chat_template(model_dir)

    def raise_exception(msg: str) -> None:
        raise ValueError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=_token_text(cfg.get("bos_token")),
        eos_token=_token_text(cfg.get("eos_token")),
    )


def apply_chat_template(model_dir: Path, user_text: str) -> str:
    return render_chat(model_dir, [{"role": "user", "content": user_text}])


def _token_text(tok: Any) -> str:
    if isinstance(tok, dict):
        return str(tok.get("content", ""))
    return tok or ""
