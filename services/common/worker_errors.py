"""Domain errors of the workers, and the one place they become gRPC status codes.

The workers' cores raise WorkerError(kind, message); the servicers call `abort_with(context, err)`.
Messages are for the router and its logs: they name the request and the cause, never a traceback.
"""

from __future__ import annotations

import enum
from typing import NoReturn

import grpc


class ErrorKind(enum.Enum):
    INVALID = grpc.StatusCode.INVALID_ARGUMENT  # bad prompt / sampling params / mismatched KV
    NOT_FOUND = grpc.StatusCode.NOT_FOUND  # no reservation / no KV for this rid
    EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED  # no room in the KV pools
    UNAVAILABLE = grpc.StatusCode.UNAVAILABLE  # KV transfer failed, engine stopped
    ABORTED = grpc.StatusCode.CANCELLED  # the request was aborted
    DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED  # waited too long (queue, KV arrival)
    INTERNAL = grpc.StatusCode.INTERNAL  # the engine failed this request


class WorkerError(Exception):
    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind.name.lower()}: {self.message}"


def abort_with(context: grpc.ServicerContext, err: WorkerError) -> NoReturn:
    context.abort(err.kind.value, err.message)
    raise AssertionError("unreachable: context.abort raises")
