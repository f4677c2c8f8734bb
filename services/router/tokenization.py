"""Tokenizer, chat prompt and model limits, read from a Hugging Face style model directory.

tokenizer.json          the `tokenizers` tokenizer (no transformers at serve time)
tokenizer_config.json   chat_template, bos/eos tokens
config.json             max_position_embeddings (the context), eos_token_id, vocab_size
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from services.common.chat_template import ChatTemplate, TemplateError
from services.router.errors import InvalidRequest
from services.router.openai_schema import ChatMessage


@dataclass(frozen=True)
class ModelInfo:
    max_context: int  # prompt + completion tokens the model can hold
    vocab_size: int  # token ids in a prompt must be below this
    eos_token_ids: frozenset[int]


class RouterTokenizer:
    def __init__(self, model_dir: Path) -> None:
        self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg = _read_json(model_dir / "config.json")
        tok_cfg = _read_json(model_dir / "tokenizer_config.json")
        gen_cfg = _read_json(model_dir / "generation_config.json")
        self.template = ChatTemplate.from_tokenizer_config(tok_cfg)
        self.info = ModelInfo(
            max_context=int(cfg.get("max_position_embeddings") or tok_cfg.get("model_max_length") or 4096),
            vocab_size=max(int(cfg.get("vocab_size") or 0), self._tok.get_vocab_size(with_added_tokens=True)),
            eos_token_ids=frozenset(self._eos_ids(cfg, gen_cfg, tok_cfg)),
        )
        self._byte_level = _decoder_type(self._tok) == "ByteLevel"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (byte-level BPE pieces may be part of a UTF-8 character)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.decode([token_id]).encode() or piece.encode()

    def chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        if self.template is None:
            raise InvalidRequest("this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self.template.render(template_messages(messages))
        except TemplateError as e:
            raise InvalidRequest(str(e), param="messages") from None
        # The template writes the special tokens itself (bos, role markers).
        return self.encode(text, add_special_tokens=False)

    def _eos_ids(self, cfg: dict[str, Any], gen_cfg: dict[str, Any], tok_cfg: dict[str, Any]) -> set[int]:
        ids: set[int] = set()
        for source in (cfg.get("eos_token_id"), gen_cfg.get("eos_token_id")):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, list):
                ids.update(t for t in source if isinstance(t, int))
        eos = tok_cfg.get("eos_token")
        eos_text = eos.get("content") if isinstance(eos, dict) else eos
        if isinstance(eos_text, str) and (tid := self._tok.token_to_id(eos_text)) is not None:
            ids.add(tid)
        return ids


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template expects them: content flattened to text (text parts only, for now)."""
    out = []
    for i, m in enumerate(messages):
        d = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(
                        f"content part type {part.get('type')!r} is not supported (only 'text')",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part["text"])
            d["content"] = "".join(texts)
        elif content is None:
            d["content"] = ""
        out.append(d)
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _decoder_type(tok: Tokenizer) -> str | None:
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    return decoder.get("type") if isinstance(decoder, dict) else None


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character byte-level BPE uses per byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table
