"""OpenAI request bodies, validated once at the boundary.

Fields a client may send that the router does not use (`user`, ...) are ignored; fields it cannot
honour with a non-default value (penalties, logit bias, echo, ...) are a 400 naming the field
rather than a silent change of meaning. Unions the spec allows
(`prompt`, `stop`) are checked by hand so that an error names the field, not a union branch.
"""

from __future__ import annotations

import array
import json
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 32
MAX_STOP_STRINGS = 16  # the engine's limit (services/engine/sampling.py)
MAX_SEED = 2**63  # proto int64, non-negative: the engine rejects negative seeds
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20

TokenIds = array.array  # array("I") of validated token ids: hashed and sent packed without a copy


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions (vLLM / SGLang spelling)
    top_k: int | None = Field(default=None, ge=-1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, v: Any) -> str | list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("must be a string or a list of strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are supported")
        return v  # type: ignore[no-any-return]

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None) -> float | None:
        if v not in (None, 0.0):
            raise ValueError("penalties are not supported (only 0)")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v:
            raise ValueError("logit_bias is not supported")
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 for t in v):
            raise ValueError("token ids must be non-negative")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> GenerationRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class HistoryFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            ok = isinstance(json.loads(v), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("must be the JSON text of an object")
        return v


class HistoryToolCall(BaseModel):
    """A tool call of an earlier assistant turn, as the client sends it back."""

    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: HistoryFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[HistoryToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this answers
    reasoning_content: str | None = None  # assistant turns: templates may render or drop it

    @model_validator(mode="after")
    def _roles(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only assistant messages have tool calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("tool_call_id: required in a message of role 'tool'")
        return self


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class ThinkingOption(BaseModel):
    """`thinking: {"type": "enabled" | "disabled"}` (MiMo's API): the template's enable_thinking."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["enabled", "disabled"]


TOOL_CHOICES = ("none", "auto", "required")
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"})


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # extensions: vLLM / SGLang's chat_template_kwargs and separate_reasoning, MiMo's thinking
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: ThinkingOption | None = None
    separate_reasoning: bool = True

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, v: list[ToolDefinition] | None) -> list[ToolDefinition] | None:
        seen: set[str] = set()
        for t in v or ():
            if t.function.name in seen:
                raise ValueError(f"function names must be unique ({t.function.name!r} is there twice)")
            seen.add(t.function.name)
        return v

    @field_validator("tool_choice", mode="plain")
    @classmethod
    def _tool_choice(cls, v: Any) -> str | dict[str, Any] | None:
        if v is None or (isinstance(v, str) and v in TOOL_CHOICES):
            return v  # type: ignore[no-any-return]
        fn = v.get("function") if isinstance(v, dict) else None
        if isinstance(v, dict) and v.get("type") == "function" and isinstance(fn, dict):
            if isinstance(fn.get("name"), str):
                return v
        raise ValueError(
            'must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}'
        )

    @field_validator("chat_template_kwargs")
    @classmethod
    def _kwargs(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = sorted(RESERVED_TEMPLATE_KWARGS & set(v or ()))
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here (the router sets them)")
        return v

    @model_validator(mode="after")
    def _tool_choice_needs_tools(self) -> ChatCompletionRequest:
        names = {t.function.name for t in self.tools or ()}
        choice = self.tool_choice
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise ValueError(f"tool_choice: no function named {choice['function']['name']!r} in tools")
        return self

    @model_validator(mode="after")
    def _thinking_agrees(self) -> ChatCompletionRequest:
        kwargs = self.chat_template_kwargs or {}
        if self.thinking is not None and "enable_thinking" in kwargs:
            if kwargs["enable_thinking"] != (self.thinking.type == "enabled"):
                raise ValueError("thinking: disagrees with chat_template_kwargs.enable_thinking")
        return self

    @property
    def template_kwargs(self) -> dict[str, Any]:
        """What the chat template gets besides messages and tools."""
        kwargs = dict(self.chat_template_kwargs or {})
        if self.thinking is not None:
            kwargs["enable_thinking"] = self.thinking.type == "enabled"
        return kwargs

    @property
    def function_name(self) -> str | None:
        """The function `tool_choice` names, if it names one."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return v

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = str | list[str] | TokenIds | list[list[int]]  # a flat id list arrives as an array("I")


class CompletionRequest(GenerationRequest):
    prompt: PromptInput
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, v: Any) -> PromptInput:
        if isinstance(v, str):
            return v
        if not isinstance(v, list) or not v:
            raise ValueError("must be a string, a list of strings, a list of token ids or a list of lists")
        ids = _token_ids(v)
        if ids is not None:
            return ids
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(p, list) and p and all(_is_token(t) for t in p) for p in v):
            return v
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of non-empty token-id lists"
        )

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported")
        return v

    @model_validator(mode="after")
    def _best_of_is_n(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of: only best_of == n is supported")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def _token_ids(v: list[Any]) -> TokenIds | None:
    """A flat list of token ids (JSON ints in [0, 2**32), bools excluded) as an array("I"), else
    None. The array takes ints and bools only; a bool can only be where the array holds 0 or 1, so
    only those places are looked at (numpy finds them), or, when there are many, the list's JSON
    (digits, commas and brackets unless a true or false is there)."""
    try:
        ids = array.array("I", v)
    except (OverflowError, TypeError):
        return None
    low = np.flatnonzero(np.frombuffer(ids, dtype=np.uint32) <= 1) if ids else ()
    if len(low) > 64:
        return None if b"e" in orjson.dumps(v) else ids  # "true" / "false"
    return None if any(type(v[i]) is bool for i in low) else ids


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0
