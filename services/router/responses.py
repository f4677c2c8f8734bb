"""OpenAI response objects for the two endpoints, whole and as stream chunks."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services.router.job import ChoiceEvent, ChoiceResult, Usage
from services.router.textstream import TokenLogprob
from services.router.toolcalls.pieces import Piece, collect, merged


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
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
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
        self._call_ids: dict[tuple[int, int], str] = {}  # (choice, call index) -> the call's id

    def response(self, results: Sequence[ChoiceResult], usage: Usage) -> dict[str, Any]:
        choices = [
            {
                "index": r.index,
                "message": self._message(r),
                "logprobs": chat_logprobs(r.logprobs) if self.env.logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ]
        return self._wrap(self.object, choices) | {"usage": usage_json(usage)}

    def _message(self, r: ChoiceResult) -> dict[str, Any]:
        if r.pieces is None:
            return {"role": "assistant", "content": r.text}
        msg = collect(r.pieces)
        out: dict[str, Any] = {"role": "assistant", "content": msg.content}
        if msg.reasoning:
            out["reasoning_content"] = msg.reasoning
        if msg.calls:
            out["content"] = msg.content if msg.content.strip() else None
            out["tool_calls"] = [
                {
                    "id": self._call_id(r.index, i),
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                }
                for i, c in enumerate(msg.calls)
            ]
        return out

    def _call_id(self, choice: int, call: int) -> str:
        return self._call_ids.setdefault((choice, call), f"call_{uuid.uuid4().hex[:24]}")

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

    def events(self, ev: ChoiceEvent) -> list[dict[str, Any]]:
        """The chunks of one event: a delta per run of one kind (reasoning, content, tool calls) in
        the order the model wrote them; the first carries the logprobs, the last the finish reason
        (for a parsed message in an empty delta of its own)."""
        logprobs = chat_logprobs(ev.logprobs) if self.env.logprobs and ev.logprobs else None
        if ev.pieces is None:
            deltas = [{"content": ev.text}] if ev.text else []
        else:
            deltas = self._deltas(ev.index, merged(ev.pieces))
            if deltas and ev.finish_reason:  # on its own, as OpenAI sends it: the client's stream
                deltas.append({})  # helper closes a call only in a chunk after the call's last piece
        if not deltas and not ev.finish_reason and logprobs is None:
            return []
        deltas = deltas or [{}]
        return [
            self._chunk(
                [
                    {
                        "index": ev.index,
                        "delta": d,
                        "logprobs": logprobs if k == 0 else None,
                        "finish_reason": ev.finish_reason if k == len(deltas) - 1 else None,
                    }
                ]
            )
            for k, d in enumerate(deltas)
        ]

    def _deltas(self, choice: int, pieces: list[Piece]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for p in pieces:
            if p.kind in ("content", "reasoning"):
                deltas.append({"content" if p.kind == "content" else "reasoning_content": p.text})
                continue
            if not deltas or "tool_calls" not in deltas[-1]:
                deltas.append({"tool_calls": []})
            calls: list[dict[str, Any]] = deltas[-1]["tool_calls"]
            if p.kind == "call":
                calls.append(
                    {
                        "index": p.index,
                        "id": self._call_id(choice, p.index),
                        "type": "function",
                        "function": {"name": p.text, "arguments": ""},
                    }
                )
            elif calls and calls[-1]["index"] == p.index:
                calls[-1]["function"]["arguments"] += p.text
            else:
                calls.append({"index": p.index, "function": {"arguments": p.text}})
        return deltas

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

    def events(self, ev: ChoiceEvent) -> list[dict[str, Any]]:
        if not ev.text and not ev.finish_reason and not (self.env.logprobs and ev.logprobs):
            return []
        logprobs = completion_logprobs(ev.logprobs) if self.env.logprobs else None
        return [
            self._chunk(
                [
                    {
                        "index": ev.index,
                        "text": ev.text,
                        "logprobs": logprobs,
                        "finish_reason": ev.finish_reason,
                    }
                ]
            )
        ]
