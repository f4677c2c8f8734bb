"""A parameter's text as the JSON value its schema types (MiMo's XML calls carry text)."""

from __future__ import annotations

from typing import Any

import pytest

from services.router.toolcalls.values import parameter_value

CASES: list[tuple[str, dict[str, Any] | None, Any]] = [
    ("\nParis\n", {"type": "string"}, "Paris"),
    ("\n\nkept\n\n", {"type": "string"}, "\nkept\n"),  # one newline each side is the format's
    ("42", {"type": "string"}, "42"),
    ("null", {"type": "string"}, "null"),
    ("42", None, "42"),  # a parameter the schema does not name
    (" 42 ", {"type": "integer"}, 42),
    ("-7", {"type": "integer"}, -7),
    ("1_000", {"type": "integer"}, "1_000"),  # Python's int() reads it; JSON does not
    ("4.5", {"type": "integer"}, "4.5"),
    ("4.5", {"type": "number"}, 4.5),
    ("3", {"type": "number"}, 3),
    ("1e3", {"type": "number"}, 1000.0),
    ("nan", {"type": "number"}, "nan"),
    ("inf", {"type": "number"}, "inf"),
    ("True", {"type": "boolean"}, True),
    ("false", {"type": "boolean"}, False),
    ("yes", {"type": "boolean"}, "yes"),
    ("null", {"type": "integer"}, None),
    ("null", {"type": ["string", "null"]}, None),
    ('{"a": [1, 2]}', {"type": "object"}, {"a": [1, 2]}),
    ("[1, 2]", {"type": "object"}, "[1, 2]"),
    ('["x"]', {"type": "array"}, ["x"]),
    ('{"a": NaN}', {"type": "object"}, '{"a": NaN}'),
    ("5", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, 5),
    ("five", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "five"),
    ("5", {"type": ["boolean", "number"]}, 5),
    ("red", {"enum": ["red", "green"]}, "red"),
    ('{"x": 1}', {"properties": {"x": {}}}, {"x": 1}),
]


@pytest.mark.parametrize(("raw", "schema", "want"), CASES)
def test_parameter_value(raw: str, schema: dict[str, Any] | None, want: Any) -> None:
    got = parameter_value(raw, schema)
    assert got == want and type(got) is type(want)
