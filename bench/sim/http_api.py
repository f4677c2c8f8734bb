"""Request parsing and response bodies of the simulated worker's HTTP API (role `both`).

Two dialects over one core: SGLang's native `/generate` and the OpenAI completions / chat API
(what vLLM serves). Prompts given as text are tokenized with bench.word_tokens (one word `t<N>` is
token N); output tokens are rendered the same way, each as " t<N>", so prompt text + completion
text tokenizes back to prompt ids + output ids. Transport-free: dicts in, dicts out.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.word_tokens import text_to_ids

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128  # sglang SamplingParams default
OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI completions default


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class GenRequest:
    """One completion to simulate, whatever the dialect."""

    rid: str
    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool = False
    model: str = ""


def tokens_text(ids: Sequence[int]) -> str:
    return "".join(f" t{int(i)}" for i in ids)


def new_rid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def _prompt_ids(value: Any, param: str) -> list[int]:
    """A text prompt or a list of token ids (a batch of one is unwrapped)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        ids = text_to_ids(value)
    elif isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        ids = list(value)
    else:
        raise BadRequest(f"{param} must be a string or a list of token ids (one prompt)", param)
    if not ids:
        raise BadRequest(f"{param} is empty", param)
    if min(ids) < 0:
        raise BadRequest("token ids must be >= 0", param)
    return ids


def _max_tokens(value: Any, default: int, param: str) -> int:
    n = default if value is None else value
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequest(f"{param} must be an integer >= 1", param)
    return n


def parse_generate(body: Mapping[str, Any]) -> GenRequest:
    """SGLang /generate: {"text" | "input_ids", "sampling_params": {"max_new_tokens", ...}, "stream"}."""
    if body.get("input_ids") is not None:
        ids = _prompt_ids(body["input_ids"], "input_ids")
    elif body.get("text") is not None:
        ids = _prompt_ids(body["text"], "text")
    else:
        raise BadRequest("give text or input_ids", "text")
    sp = body.get("sampling_params") or {}
    if not isinstance(sp, Mapping):
        raise BadRequest("sampling_params must be an object", "sampling_params")
    n = _max_tokens(sp.get("max_new_tokens"), SGLANG_DEFAULT_MAX_NEW_TOKENS, "max_new_tokens")
    rid = body.get("rid") if isinstance(body.get("rid"), str) else new_rid("gen")
    return GenRequest(str(rid), ids, n, bool(body.get("stream", False)))


def parse_completion(body: Mapping[str, Any]) -> GenRequest:
    if "prompt" not in body:
        raise BadRequest("prompt is required", "prompt")
    ids = _prompt_ids(body["prompt"], "prompt")
    n = _max_tokens(body.get("max_tokens"), OPENAI_DEFAULT_MAX_TOKENS, "max_tokens")
    return _openai(body, ids, n, "cmpl")


def parse_chat(body: Mapping[str, Any]) -> GenRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    parts = []
    for m in messages:
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        if not isinstance(content, str):
            raise BadRequest("every message needs a text content", "messages")
        parts.append(content)
    ids = _prompt_ids(" ".join(parts), "messages")
    n = _max_tokens(
        body.get("max_completion_tokens", body.get("max_tokens")), OPENAI_DEFAULT_MAX_TOKENS, "max_tokens"
    )
    return _openai(body, ids, n, "chatcmpl")


def _openai(body: Mapping[str, Any], ids: list[int], n: int, prefix: str) -> GenRequest:
    opts = body.get("stream_options") or {}
    include_usage = bool(opts.get("include_usage")) if isinstance(opts, Mapping) else False
    return GenRequest(
        new_rid(prefix), ids, n, bool(body.get("stream", False)), include_usage, str(body.get("model", ""))
    )


# -- responses ------------------------------------------------------------------------------------
def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def generate_body(
    req: GenRequest, out_ids: Sequence[int], cached: int, finish: str | None, started: float
) -> dict[str, Any]:
    """SGLang /generate body, cumulative (as SGLang streams it); finish None while streaming."""
    reason = {"type": "length", "length": len(out_ids)} if finish == "length" else finish
    return {
        "text": tokens_text(out_ids),
        "output_ids": list(out_ids),
        "meta_info": {
            "id": req.rid,
            "finish_reason": reason,
            "prompt_tokens": len(req.prompt_ids),
            "completion_tokens": len(out_ids),
            "cached_tokens": cached,
            "e2e_latency": time.monotonic() - started,
            "simulated": True,
        },
    }


@dataclass(frozen=True)
class OpenAIEnvelope:
    rid: str
    model: str
    chat: bool
    created: int

    @classmethod
    def of(cls, req: GenRequest, served_model: str, chat: bool) -> OpenAIEnvelope:
        return cls(req.rid, req.model or served_model, chat, int(time.time()))

    def _wrap(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        obj = f"{kind}.chunk" if self.chat and chunk else kind
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def _choice(self, text: str, finish: str | None, delta: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {
            "index": 0,
            key: {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish,
        }

    def response(self, out_ids: Sequence[int], finish: str, use: dict[str, Any]) -> dict[str, Any]:
        return self._wrap([self._choice(tokens_text(out_ids), finish, False)], False) | {"usage": use}

    def chunk(self, ids: Sequence[int], finish: str | None) -> dict[str, Any]:
        return self._wrap([self._choice(tokens_text(ids), finish, True)], True)

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        return self._wrap([], True) | {"usage": use}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}
