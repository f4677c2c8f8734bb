"""The router's fast path for token-id prompts (app._parse_id_prompt: the ids read by the C reader,
the rest of the body by orjson) gives the general path's request (app._parse_json) whenever it
answers, on random bodies: prompts of ids spelled in every way JSON allows, other prompt kinds,
duplicate and nested "prompt" keys, invalid fields and broken JSON. It must answer for the plain
case (else the test could not fail), and the general path stays the one that names errors."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from services.common import json_ids
from services.router.app import _parse_id_prompt, _parse_json
from services.router.errors import RouterError
from services.router.openai_schema import ChatCompletionRequest, CompletionRequest

pytestmark = pytest.mark.skipif(not json_ids.reader_built(), reason="the C id reader is not built")


def _fields(req: Any) -> dict[str, Any]:
    return {k: getattr(req, k) for k in type(req).model_fields}


def _general(raw: bytes, model: Any) -> tuple[str, Any]:
    try:
        req, _ = _parse_json(raw, model)
    except RouterError as e:
        return "error", (type(e), str(e))
    return "ok", _fields(req)


def _ids_text(rng: random.Random, ids: list[Any]) -> str:
    ws = lambda: rng.choice(("", "", " ", "\n", " \t"))  # noqa: E731
    return "[" + ws() + ",".join(ws() + str(v).lower() + ws() for v in ids) + ws() + "]"


def _body(rng: random.Random) -> bytes:
    ids: list[Any] = [rng.randrange(200_000) for _ in range(rng.randrange(1, 300))]
    kind = rng.randrange(12)
    if kind == 1:
        ids[rng.randrange(len(ids))] = rng.choice((-1, 1.5, "1e3", True, False, 2**32, "01", "null"))
    prompt = _ids_text(rng, ids)
    if kind == 2:
        prompt = "[]"
    elif kind == 3:
        prompt = orjson.dumps(rng.choice(("hello", ["a", "b"], [[1, 2], [3]], [[]], 7))).decode()
    members = ['"model": "m"', f'"max_tokens": {rng.choice((8, 8, 8, -1, "8"))}']
    if kind == 4:
        members.append('"stream": true')
    if kind == 5:
        members.append('"echo": true')  # refused by the schema
    members.insert(rng.randrange(len(members) + 1), f'"prompt" : {prompt}')
    if kind == 6:
        members.append(f'"prompt": {_ids_text(rng, [1, 2, 3])}')  # a duplicate key: the last wins
    if kind == 7:
        members.insert(0, f'"prompt": {_ids_text(rng, [4, 5])}')
    if kind == 8:
        members.insert(0, f'"metadata": {{"prompt": {_ids_text(rng, [9, 9])}}}')
    if kind == 9:
        members.insert(0, '"user": "say \\"prompt\\": [1, 2]"')
    text = "{" + ", ".join(members) + "}"
    if kind == 10:
        text = text[: rng.randrange(len(text))]  # cut: not JSON
    if kind == 11:
        text = "[" + text + "]"  # not an object
    return text.encode()


def test_fast_path_agrees_with_the_general_one_on_random_bodies() -> None:
    rng = random.Random(3)
    answered = 0
    for _ in range(1500):
        raw = _body(rng)
        fast = _parse_id_prompt(raw, CompletionRequest)
        if fast is None:
            continue
        answered += 1
        req, data = fast
        assert _general(raw, CompletionRequest) == ("ok", _fields(req)), raw[:200]
        assert req.prompt.typecode == "I" and data["prompt"] is req.prompt
    assert answered > 300


def test_plain_id_prompt_takes_the_fast_path() -> None:
    ids = list(range(0, 50_000, 7))
    raw = orjson.dumps({"model": "m", "prompt": ids, "max_tokens": 8, "stream": True})
    got = _parse_id_prompt(raw, CompletionRequest)
    assert got is not None
    assert got[0].prompt.tolist() == ids
    assert _fields(got[0]) == _general(raw, CompletionRequest)[1]


def test_not_taken_where_it_could_differ() -> None:
    for raw in (
        b'{"model": "m", "prompt": [1, 2], "prompt": "text", "max_tokens": 8}',  # a later duplicate wins
        b'{"model": "m", "metadata": {"prompt": [1, 2]}, "prompt": "x"}',  # a nested key first
        b'{"model": "m", "prompt": [1, 2], "max_tokens": -1}',  # invalid: the general path says why
        b'{"model": "m", "prompt": [1, 2], "max_tokens": 8',  # not JSON
        b'{"model": "m", "prompt": [1, true]}',
    ):
        assert _parse_id_prompt(raw, CompletionRequest) is None, raw
    chat = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "prompt": [1, 2]}'
    assert _parse_id_prompt(chat, ChatCompletionRequest) is None  # no prompt field there
