"""Bad requests and failing workers: each answer is an OpenAI error object with the right status."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from services.router.workers import StaticWorkerPool
from tests.router.conftest import MAX_CONTEXT, MODEL, Cluster, serve_router
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG_TEXT = "word " * (MAX_CONTEXT + 10)


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MSG, **kw}


def comp(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "hi", **kw}


BAD_REQUESTS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    # path, case, body, status, param, code
    (CHAT, "unknown model", chat(model="gpt-9"), 404, "model", "model_not_found"),
    (CHAT, "missing model", {"messages": MSG}, 400, "model", None),
    (CHAT, "missing messages", {"model": MODEL}, 400, "messages", None),
    (CHAT, "empty messages", chat(messages=[]), 400, "messages", None),
    (CHAT, "bad role", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", None),
    (
        CHAT,
        "image part",
        chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages[0].content[0]",
        None,
    ),
    (CHAT, "content type", chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    (CHAT, "temperature type", chat(temperature="hot"), 400, "temperature", None),
    (CHAT, "n as string", chat(n="2"), 400, "n", None),
    (CHAT, "stream as int", chat(stream=1), 400, "stream", None),
    (CHAT, "stream_options type", chat(stream=True, stream_options=3), 400, "stream_options", None),
    (CHAT, "temperature range", chat(temperature=3), 400, "temperature", None),
    (CHAT, "top_p zero", chat(top_p=0), 400, "top_p", None),
    (CHAT, "n zero", chat(n=0), 400, "n", None),
    (CHAT, "max_tokens zero", chat(max_tokens=0), 400, "max_tokens", None),
    (CHAT, "negative seed", chat(seed=-1), 400, "seed", None),
    (CHAT, "stop ints", chat(stop=[1, 2]), 400, "stop", None),
    (CHAT, "stop empty string", chat(stop=[""]), 400, "stop", None),
    (CHAT, "penalty", chat(presence_penalty=0.5), 400, "presence_penalty", None),
    (CHAT, "tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools", None),
    (CHAT, "top_logprobs alone", chat(top_logprobs=2), 400, "top_logprobs", None),
    (CHAT, "stream_options alone", chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    (
        CHAT,
        "prompt too long",
        chat(messages=[{"role": "user", "content": LONG_TEXT}]),
        400,
        "messages",
        "context_length_exceeded",
    ),
    (
        CHAT,
        "max_tokens beyond context",
        chat(max_tokens=MAX_CONTEXT),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
    (
        CHAT,
        "max_completion_tokens beyond context",
        chat(max_completion_tokens=MAX_CONTEXT),
        400,
        "max_completion_tokens",
        "context_length_exceeded",
    ),
    (COMPLETIONS, "missing prompt", {"model": MODEL}, 400, "prompt", None),
    (COMPLETIONS, "empty prompt list", comp(prompt=[]), 400, "prompt", None),
    (COMPLETIONS, "float ids", comp(prompt=[1.5, 2]), 400, "prompt", None),
    (COMPLETIONS, "mixed prompt", comp(prompt=["a", 1]), 400, "prompt", None),
    (COMPLETIONS, "empty text", comp(prompt=""), 400, "prompt", None),
    (COMPLETIONS, "id beyond vocab", comp(prompt=[1, 10**6]), 400, "prompt", None),
    (COMPLETIONS, "bool id", comp(prompt=[1, True, 2]), 400, "prompt", None),
    (COMPLETIONS, "bool id, stream true", comp(prompt=[1, False], stream=True), 400, "prompt", None),
    (COMPLETIONS, "bool in an id list", comp(prompt=[[1, 2], [True]]), 400, "prompt", None),
    (COMPLETIONS, "negative id", comp(prompt=[3, -1]), 400, "prompt", None),
    (COMPLETIONS, "id beyond uint32", comp(prompt=[3, 2**32]), 400, "prompt", None),
    (COMPLETIONS, "logprobs too many", comp(logprobs=10), 400, "logprobs", None),
    (COMPLETIONS, "echo", comp(echo=True), 400, "echo", None),
    (COMPLETIONS, "too long ids", comp(prompt=[5] * MAX_CONTEXT), 400, "prompt", "context_length_exceeded"),
    (
        COMPLETIONS,
        "max_tokens beyond context",
        comp(prompt=[5] * 10, max_tokens=MAX_CONTEXT - 9),
        400,
        "max_tokens",
        "context_length_exceeded",
    ),
]


@pytest.mark.parametrize(
    "path, body, status, param, code", [c[:1] + c[2:] for c in BAD_REQUESTS], ids=[c[1] for c in BAD_REQUESTS]
)
def test_bad_request(
    fakes: Cluster, path: str, body: Any, status: int, param: str | None, code: str | None
) -> None:
    before = len(fakes.prefill.requests)
    r = fakes.http.post(path, json=body)
    _assert_error(r, status, param=param, code=code)
    assert len(fakes.prefill.requests) == before  # rejected before any worker saw it


@pytest.mark.parametrize(
    "content, headers",
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"[1, 2]", {"content-type": "application/json"}),
        (b"", {}),
        (b"\xff\xfe", {"content-type": "application/json"}),
        (b'{"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', {}),
    ],
)
def test_malformed_body(fakes: Cluster, content: bytes, headers: dict[str, str]) -> None:
    r = fakes.http.post(CHAT, content=content, headers=headers)
    _assert_error(r, 400)


def test_unknown_route_and_method(fakes: Cluster) -> None:
    _assert_error(fakes.http.get("/v1/nothing"), 404)
    _assert_error(fakes.http.get(CHAT), 405)
    _assert_error(fakes.http.get("/v1/models/gpt-9"), 404, param="model", code="model_not_found")


def test_router_still_serves_after_bad_requests(fakes: Cluster) -> None:
    for _, _, body, *_ in BAD_REQUESTS[:5]:
        fakes.http.post(CHAT, json=body)
    r = fakes.http.post(CHAT, json=chat(temperature=0))
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_prefill_failure_before_first_token(fakes: Cluster, stream: bool) -> None:
    fakes.prefill.fail_with = grpc.StatusCode.INTERNAL
    r = fakes.http.post(CHAT, json=chat(stream=stream))
    _assert_error(r, 502, code="worker_error")
    assert "fake prefill failure" not in r.text  # a worker's internal message stays internal
    rid = fakes.prefill.requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)  # the reservation is released


@pytest.mark.parametrize("reason", ["abort", "exploded"])
def test_prefill_abort_finish_is_502_before_streaming(fakes: Cluster, reason: str) -> None:
    fakes.prefill.finish_override = reason
    _assert_error(fakes.http.post(CHAT, json=chat(stream=True)), 502, code="worker_error")
    rid = fakes.prefill.requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)


def test_prefill_invalid_argument_is_the_clients(fakes: Cluster) -> None:
    fakes.prefill.fail_with = grpc.StatusCode.INVALID_ARGUMENT
    _assert_error(fakes.http.post(COMPLETIONS, json=comp()), 400)


def test_prefill_overloaded(fakes: Cluster) -> None:
    fakes.prefill.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
    _assert_error(fakes.http.post(COMPLETIONS, json=comp()), 503, code="overloaded")


def test_reserve_refused(fakes: Cluster) -> None:
    fakes.decode.reserve_ok = False
    r = fakes.http.post(CHAT, json=chat())
    _assert_error(r, 503, code="no_worker_available")
    assert "fake decode worker is full" in r.json()["error"]["message"]


def test_decode_dies_mid_request(fakes: Cluster) -> None:
    fakes.decode.die_after_chunks = 2
    _assert_error(fakes.http.post(CHAT, json=chat(temperature=0)), 503, code="worker_unavailable")


def test_decode_dies_mid_stream_ends_with_error_event(fakes: Cluster) -> None:
    fakes.decode.die_after_chunks = 2
    fakes.decode.chunk_size = 1
    stream = fakes.client.chat.completions.create(model=MODEL, messages=MSG, temperature=0, stream=True)  # type: ignore[arg-type]
    got = ""
    with pytest.raises(openai.APIError, match="decode worker is unavailable"):
        for c in stream:
            got += c.choices[0].delta.content or ""
    assert got  # tokens arrived before the failure
    with fakes.http.stream("POST", CHAT, json=chat(temperature=0, stream=True)) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    err = json.loads(events[-2].removeprefix("data: "))["error"]
    assert err["code"] == "worker_unavailable" and err["type"] == "server_error"


def test_client_disconnect_aborts_decode(fakes: Cluster) -> None:
    fakes.decode.chunk_delay_s = 0.05
    fakes.decode.chunk_size = 1
    with httpx.Client(base_url=fakes.router.base_url, timeout=10) as h:
        with h.stream(
            "POST",
            CHAT,
            json=chat(temperature=0, stream=True, messages=[{"role": "user", "content": "[long]"}]),
        ) as r:
            lines = r.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
    rid = fakes.decode.decode_requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)
    assert rid not in fakes.decode.finished
    _eventually(lambda: "swaserve_router_inflight_requests 0.0" in fakes.http.get("/metrics").text)


@pytest.fixture
def lonely(model_dir: Path, toy: ToyModel) -> Iterator[tuple[FakePrefillWorker, FakeDecodeWorker, str]]:
    prefill, decode = FakePrefillWorker(toy).start(), FakeDecodeWorker(toy).start()
    yield prefill, decode, f"127.0.0.1:{_free_port()}"
    prefill.stop()
    decode.stop()


@pytest.mark.parametrize("missing", ["prefill", "decode", "both"])
def test_no_worker_is_503(
    model_dir: Path, lonely: tuple[FakePrefillWorker, FakeDecodeWorker, str], missing: str
) -> None:
    prefill, decode, _ = lonely
    pool = StaticWorkerPool(
        [] if missing in ("prefill", "both") else [prefill.addr],
        [] if missing in ("decode", "both") else [decode.addr],
    )
    router = serve_router(model_dir, pool)
    try:
        with router.http() as h:
            r = h.post(CHAT, json=chat())
            _assert_error(r, 503, code="no_worker_available")
            assert ("decode" if missing == "decode" else "prefill") in r.json()["error"]["message"]
            assert h.get("/health").json()["status"] == "no_workers"
    finally:
        router.close()


@pytest.mark.parametrize("dead", ["prefill", "decode"])
def test_unreachable_worker_is_503_then_skipped(
    model_dir: Path, lonely: tuple[FakePrefillWorker, FakeDecodeWorker, str], dead: str
) -> None:
    prefill, decode, nowhere = lonely
    pool = StaticWorkerPool(
        [nowhere, prefill.addr] if dead == "prefill" else [prefill.addr],
        [nowhere, decode.addr] if dead == "decode" else [decode.addr],
        down_seconds=60,
    )
    router = serve_router(model_dir, pool, max_attempts=1)
    try:
        with router.http() as h:
            statuses = [h.post(COMPLETIONS, json=comp(max_tokens=3)).status_code for _ in range(4)]
    finally:
        router.close()
    # the dead worker fails at most one request (prefill: 503; decode: Reserve falls through to the next)
    assert statuses.count(200) >= 3 and set(statuses) <= {200, 503}
    assert dead == "prefill" or statuses == [200] * 4


def test_unreachable_prefill_is_retried_on_another(
    model_dir: Path, lonely: tuple[FakePrefillWorker, FakeDecodeWorker, str]
) -> None:
    prefill, decode, nowhere = lonely
    router = serve_router(model_dir, StaticWorkerPool([nowhere, prefill.addr], [decode.addr]), max_attempts=2)
    try:
        with router.http() as h:
            statuses = [h.post(COMPLETIONS, json=comp(max_tokens=3)).status_code for _ in range(4)]
    finally:
        router.close()
    assert statuses == [200] * 4


def _assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _eventually(cond: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_client_gone_during_non_streaming_request_aborts(fakes: Cluster) -> None:
    fakes.decode.chunk_delay_s = 0.1
    fakes.decode.chunk_size = 1
    with httpx.Client(base_url=fakes.router.base_url, timeout=0.5) as h, pytest.raises(httpx.ReadTimeout):
        h.post(CHAT, json=chat(temperature=0, messages=[{"role": "user", "content": "[long]"}]))
    rid = fakes.decode.decode_requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)
    assert rid not in fakes.decode.finished
    _eventually(lambda: 'status="499"' in fakes.http.get("/metrics").text)


def test_client_gone_during_prefill_aborts_both_workers(fakes: Cluster) -> None:
    fakes.prefill.delay_s = 1.0
    with httpx.Client(base_url=fakes.router.base_url, timeout=0.3) as h, pytest.raises(httpx.ReadTimeout):
        h.post(CHAT, json=chat(stream=True))
    rid = fakes.prefill.requests[-1].rid
    _eventually(lambda: rid in fakes.prefill.aborted and rid in fakes.decode.aborted)


def test_reserve_falls_through_to_a_decode_worker_with_room(
    model_dir: Path, toy: ToyModel, lonely: tuple[FakePrefillWorker, FakeDecodeWorker, str]
) -> None:
    prefill, decode, _ = lonely
    full = FakeDecodeWorker(toy, reserve_ok=False).start()
    router = serve_router(model_dir, StaticWorkerPool([prefill.addr], [full.addr, decode.addr]))
    try:
        with router.http() as h:
            statuses = [h.post(COMPLETIONS, json=comp(max_tokens=4)).status_code for _ in range(4)]
    finally:
        router.close()
        full.stop()
    assert statuses == [200] * 4
    assert len(decode.decode_requests) == 4 and not full.decode_requests


def test_fastapi_validation_errors_are_400(model_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from services.router.app import create_app
    from tests.router.conftest import router_settings

    app = create_app(router_settings(model_dir), StaticWorkerPool([], []))

    @app.get("/typed")
    async def typed(x: int) -> dict[str, int]:  # a typed route: FastAPI itself validates it
        return {"x": x}

    with TestClient(app) as c:
        _assert_error(c.get("/typed", params={"x": "abc"}), 400, param="x")
        _assert_error(c.get("/typed"), 400, param="x")
        assert c.get("/typed", params={"x": "3"}).json() == {"x": 3}


class _BrokenPool:
    def prefill_workers(self) -> list[Any]:
        raise ConnectionError("redis is down")

    def decode_workers(self) -> list[Any]:
        raise ConnectionError("redis is down")

    def mark_down(self, addr: str) -> None:
        pass


def test_discovery_failure_is_503(model_dir: Path) -> None:
    router = serve_router(model_dir, _BrokenPool())
    try:
        with router.http() as h:
            r = h.post(CHAT, json=chat())
            _assert_error(r, 503, code="no_worker_available")
            assert "redis" not in r.text
            assert h.get("/health").json()["status"] == "discovery_failed"
    finally:
        router.close()


def test_a_non_streamed_request_runs_again_when_its_decode_worker_dies(
    model_dir: Path, toy: ToyModel, lonely: tuple[FakePrefillWorker, FakeDecodeWorker, str]
) -> None:
    """Nothing of a non-streamed answer has reached the client when its decode worker dies: the
    router runs it again avoiding that worker and answers once. Distinct prompts until one was
    decoded on the dying worker (the decode tie-break follows the prompt: each is a coin toss)."""
    prefill, decode, _ = lonely
    dying = FakeDecodeWorker(toy).start()
    dying.chunk_size, dying.die_after_chunks = 1, 1
    router = serve_router(
        model_dir, StaticWorkerPool([prefill.addr], [dying.addr, decode.addr], down_seconds=60)
    )
    answers = []
    try:
        with router.http() as h:
            for i in range(24):
                answers.append(h.post(COMPLETIONS, json=comp(prompt=f"hi {i}", max_tokens=6, temperature=0)))
                if dying.decode_requests and i >= 3:
                    break
            metrics = h.get("/metrics").text
    finally:
        router.close()
        dying.stop()
    assert dying.decode_requests  # it was chosen, and died mid-answer
    assert [r.status_code for r in answers] == [200] * len(answers), [r.text for r in answers]
    assert all(r.json()["usage"]["completion_tokens"] == 6 for r in answers)
    retries = re.search(r"^swaserve_router_retries_total (\S+)$", metrics, re.M)
    assert retries is not None and float(retries.group(1)) >= len(dying.decode_requests)
