"""Domain errors of the router and the one place they become HTTP statuses and OpenAI error bodies.

Every error the router answers with is a `RouterError`: the client's mistakes are 4xx with a message
that names the parameter; worker trouble is 502/503/504 with a message that never carries an
internal exception text. Anything else is a bug and answers 500 with a fixed message.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class RouterError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class InvalidRequest(RouterError):
    """The client's mistake: a bad parameter, a prompt that does not fit, ..."""

    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ModelNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RouteNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class NoWorkerAvailable(RouterError):
    """No prefill or no decode worker is registered, or none would take the request."""

    status = 503
    code = "no_worker_available"


class WorkerUnavailable(RouterError):
    """A chosen worker could not be reached (or went away) before the request could complete."""

    status = 503
    code = "worker_unavailable"


class WorkerFailed(RouterError):
    """A worker answered with an error or broke the protocol."""

    status = 502
    code = "worker_error"


class WorkerTimeout(RouterError):
    status = 504
    code = "worker_timeout"


INTERNAL_ERROR_MESSAGE = "internal error in the router"


def error_body(err: RouterError) -> dict[str, Any]:
    """The OpenAI error object: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def internal_error_body() -> dict[str, Any]:
    return {"error": {"message": INTERNAL_ERROR_MESSAGE, "type": "server_error", "param": None, "code": None}}


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> InvalidRequest:
    """Pydantic / FastAPI validation errors as one 400 naming the first bad parameter."""
    if not errors:
        return InvalidRequest("invalid request")
    e = errors[0]
    kind = str(e.get("type", ""))
    msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
    loc = list(e.get("loc", ()))
    if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # where FastAPI found it
        loc = loc[1:]
    if kind == "json_invalid":
        return InvalidRequest("the request body is not valid JSON")
    if not loc:
        head, sep, rest = msg.partition(": ")
        if sep and head.isidentifier():  # a model-level check names its field first
            return InvalidRequest(f"Invalid value for '{head}': {rest}", param=head)
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            return InvalidRequest("the request body must be a JSON object")
        return InvalidRequest(msg)
    param = _loc_to_param(loc)
    if kind == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'", param=param)
    return InvalidRequest(f"Invalid value for '{param}': {msg}", param=param)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _loc_to_param(loc: Sequence[Any]) -> str:
    """("messages", 0, "content", "str") -> "messages[0].content"; union-branch tags are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _is_type_tag(str(part)):
            out += f".{part}" if out else str(part)
    return out


def _is_type_tag(part: str) -> bool:
    # pydantic names a union's branch by its type ("str", "list[int]", "StreamOptions", "function-plain[...]");
    # OpenAI parameter names are snake_case
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()
