"""A JSON array of token ids read into an array("I") in one C call, without a Python int per id.

    ids, end = read_id_array(body, at)      # body[at] == "[": the ids, and the offset after "]"
    read_id_array(...) is None              # not the strict form below, or the C reader not built

Only the strict form is read (json_ids_native.c): '[' ws int (ws ',' ws int)* ws ']', each int
JSON's own spelling of an integer in [0, 2**32): no sign, fraction, exponent or leading zero; at
least one id. A caller falls back to its general JSON parser for anything else, so this never
decides what is an error. An 85k-token prompt: ~0.2 ms here against ~2-3 ms for orjson's list
plus the array("I") and bool checks (bench/prompt_cpu.py).
"""

from __future__ import annotations

import array
import ctypes
import os
from collections.abc import Callable
from pathlib import Path

NATIVE_LIBRARY = Path(__file__).with_name("_json_ids_native.so")


def read_id_array(body: bytes, at: int) -> tuple[array.array[int], int] | None:
    """The ids of the array starting at body[at], and the offset just past its "]"; None when the
    array is not in the strict form (or the C library is not built: SWASERVE_PURE_JSON_IDS set)."""
    if _NATIVE is None or not 0 <= at < len(body) or body[at] != 0x5B:  # "["
        return None
    n = len(body) - at
    cap = (n + 1) // 2  # an id is at least one digit and a comma
    out = array.array("I", [0]) * cap
    end = ctypes.c_size_t(0)
    start = ctypes.cast(ctypes.c_char_p(body), ctypes.c_void_p).value  # body's own buffer, no copy
    assert start is not None
    count = _NATIVE(start + at, n, ctypes.byref(end), out.buffer_info()[0], cap)
    if count < 0:
        return None
    del out[count:]
    return out, at + end.value


def reader_built() -> bool:
    """Whether the C reader is loaded (else `read_id_array` always answers None)."""
    return _NATIVE is not None


def _load_native() -> Callable[..., int] | None:
    if os.environ.get("SWASERVE_PURE_JSON_IDS"):
        return None
    try:
        lib = ctypes.CDLL(str(NATIVE_LIBRARY))
    except OSError:  # not built here (no C compiler at setup): callers parse the general way
        return None
    fn = lib.swaserve_json_uint32_array
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                   ctypes.c_size_t]  # fmt: skip
    fn.restype = ctypes.c_long
    return fn  # type: ignore[no-any-return]


_NATIVE = _load_native()

__all__ = ["NATIVE_LIBRARY", "read_id_array", "reader_built"]
