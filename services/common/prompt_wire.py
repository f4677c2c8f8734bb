"""Prompt token ids on the wire: packed bytes, one shared encoder and decoder.

A PrefillRequest or DecodeRequest (proto/worker.proto) carries its prompt in `prompt_ids_packed`:

    token 0       token 1       ...
    [u32 LE]      [u32 LE]      4 bytes a token, little-endian unsigned, no header

Building a `repeated int32` field of a 32k-token prompt costs the sender ~0.5 ms and the receiver
as much again; the packed form is one copy of a buffer the router already holds (its validated
`array("I")`). Every receiver reads a prompt through `prompt_ids_of`.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from typing import Protocol

from services.common.worker_errors import ErrorKind, WorkerError

MAX_TOKEN_ID = 2**32 - 1
_LITTLE = sys.byteorder == "little"


class PromptMessage(Protocol):
    """A PrefillRequest or a DecodeRequest, as far as its prompt goes."""

    @property
    def rid(self) -> str: ...

    @property
    def prompt_ids_packed(self) -> bytes: ...


def token_array(ids: Sequence[int]) -> array.array[int]:
    """`ids` as an array("I") (the same object if it already is one). Raises ValueError for
    anything but ints in [0, 2**32)."""
    if isinstance(ids, array.array) and ids.typecode == "I":
        return ids
    try:
        return array.array("I", ids)
    except (OverflowError, TypeError) as e:
        raise ValueError(f"token ids must be ints in [0, {MAX_TOKEN_ID}]") from e


def pack_ids(ids: Sequence[int]) -> bytes:
    """The wire form of `ids`: little-endian uint32, 4 bytes a token."""
    arr = token_array(ids)
    if _LITTLE:
        return arr.tobytes()
    swapped = array.array("I", arr)  # pragma: no cover - big-endian hosts only
    swapped.byteswap()
    return swapped.tobytes()


def unpack_ids(data: bytes) -> list[int]:
    """`pack_ids`'s output back as a list of ints. Raises ValueError unless len(data) % 4 == 0."""
    if len(data) % 4:
        raise ValueError(f"packed prompt ids: {len(data)} bytes is not a whole number of 4-byte ids")
    arr = array.array("I")
    arr.frombytes(data)
    if not _LITTLE:  # pragma: no cover - big-endian hosts only
        arr.byteswap()
    return arr.tolist()


def prompt_ids_of(msg: PromptMessage) -> list[int]:
    """The prompt of a request. Raises ValueError if the packed bytes are malformed (a receiver
    answers INVALID_ARGUMENT)."""
    return unpack_ids(msg.prompt_ids_packed)


def parse_prompt(msg: PromptMessage) -> list[int]:
    """`prompt_ids_of` for a worker's servicer: a malformed prompt is a WorkerError INVALID
    (the client sees INVALID_ARGUMENT)."""
    try:
        return prompt_ids_of(msg)
    except ValueError as e:
        raise WorkerError(ErrorKind.INVALID, f"{msg.rid}: {e}") from None


if array.array("I").itemsize != 4:  # pragma: no cover - no such platform in use
    raise ImportError("prompt_wire needs a 4-byte array('I')")
