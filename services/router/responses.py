"""OpenAI response objects for the two endpoints, whole and as stream chunks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.router.job import ChoiceEvent, ChoiceResult, Usage
from services.router.textstream import TokenLogprob


def usage_json(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": u.cached_tokens,
            # swaserve extension: where the cached tokens came from (device L1, host L2, GCache L3)
            "cached_tokens_by_tier": {
                "l1": u.cached_tokens - u.cached_tokens_l2 - u.cached_tokens_l3,
                "l2": u.cached_tokens_l2,
                "l3": u.cached_tokens_l3,
            },
        },
    }


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes), "top_logprobs": []}
            for e in entries
        ]
    }


def completion_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{} for _ in entries],
        "text_offset": [e.text_offset for e in entries],
    }


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


@dataclass(frozen=True)
class Envelope:
    """What every object of one response shares."""

    id: str
    model: str
    created: int
    logprobs: bool


class ChatFormat:
    id_prefix = "chatcmpl"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def __init__(self, env: Envelope) -> None:
        self.env = env

    def response(self, results: Sequence[ChoiceResult], usage: Usage) -> dict[str, Any]:
        choices = [
            {
                "index": r.index,
                "message": {"role": "assistant", "content": r.text},
                "logprobs": chat_logprobs(r.logprobs) if self.env.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ]
        return self._wrap(self.object, choices) | {"usage": usage_json(usage)}

    def opening(self, num_choices: int) -> list[dict[str, Any]]:
        """The role announcement every chat stream starts with, one per choice."""
        return [
            self._chunk(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i in range(num_choices)
        ]

    def event(self, ev: ChoiceEvent) -> dict[str, Any] | None:
        if not ev.text and not ev.finish_reason and not (self.env.logprobs and ev.logprobs):
            return None
        delta = {"content": ev.text} if ev.text else {}
        logprobs = chat_logprobs(ev.logprobs) if self.env.logprobs and ev.logprobs else None
        return self._chunk(
            [{"index": ev.index, "delta": delta, "logprobs": logprobs, "finish_reason": ev.finish_reason}]
        )

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        return self._wrap(self.chunk_object, []) | {"usage": usage_json(usage)}

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return self._wrap(self.chunk_object, choices)

    def _wrap(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        e = self.env
        return {"id": e.id, "object": obj, "created": e.created, "model": e.model, "choices": choices}


class CompletionFormat(ChatFormat):
    id_prefix = "cmpl"
    object = "text_completion"
    chunk_object = "text_completion"

    def response(self, results: Sequence[ChoiceResult], usage: Usage) -> dict[str, Any]:
        choices = [
            {
                "index": r.index,
                "text": r.text,
                "logprobs": completion_logprobs(r.logprobs) if self.env.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ]
        return self._wrap(self.object, choices) | {"usage": usage_json(usage)}

    def opening(self, num_choices: int) -> list[dict[str, Any]]:
        return []

    def event(self, ev: ChoiceEvent) -> dict[str, Any] | None:
        if not ev.text and not ev.finish_reason and not (self.env.logprobs and ev.logprobs):
            return None
        logprobs = completion_logprobs(ev.logprobs) if self.env.logprobs else None
        return self._chunk(
            [{"index": ev.index, "text": ev.text, "logprobs": logprobs, "finish_reason": ev.finish_reason}]
        )
