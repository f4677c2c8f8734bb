"""A parameter's text (MiMo / Qwen3-Coder XML calls carry raw text) as the JSON value its schema types.

The first type of the schema's `type` (a name or a list; `anyOf` / `oneOf` branches too) that
reads the text wins; a parameter the schema does not describe, or text no type reads, stays a
string. One newline after the opening tag and one before the closing tag are the format's, not the value's.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_NO_VALUE = object()


def parameter_value(raw: str, schema: Mapping[str, Any] | None) -> Any:
    text = raw[1:] if raw.startswith("\n") else raw
    text = text[:-1] if text.endswith("\n") else text
    types = schema_types(schema)
    if not types or types == ["string"]:
        return text
    if text.strip() == "null" and ("null" in types or "string" not in types):
        return None
    for t in types:
        value = _read(t, text.strip())
        if value is not _NO_VALUE:
            return value
    return text


def schema_types(schema: Mapping[str, Any] | None) -> list[str]:
    if not isinstance(schema, Mapping):
        return []
    t = schema.get("type")
    types = [t] if isinstance(t, str) else [x for x in t if isinstance(x, str)] if isinstance(t, list) else []
    for key in ("anyOf", "oneOf"):
        for branch in schema.get(key) or ():
            types += [x for x in schema_types(branch) if x not in types]
    if not types and "enum" in schema:
        types = ["string"]
    if not types and "properties" in schema:
        types = ["object"]
    return types


def _read(t: str, s: str) -> Any:
    if t == "integer" and _INTEGER.fullmatch(s):
        return int(s)
    if t == "number" and _NUMBER.fullmatch(s):
        if _INTEGER.fullmatch(s):
            return int(s)
        f = float(s)
        return f if math.isfinite(f) else _NO_VALUE
    if t == "boolean" and s.lower() in ("true", "false"):
        return s.lower() == "true"
    if t in ("object", "array"):
        try:
            value = json.loads(s, parse_constant=_no_constant)
        except ValueError:
            return _NO_VALUE
        return value if isinstance(value, dict if t == "object" else list) else _NO_VALUE
    return _NO_VALUE


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
