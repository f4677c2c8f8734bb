"""The router end to end with the official openai client, against FAKE gRPC workers (fake_workers.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.common.prompt_wire import prompt_ids_of
from services.router.openai_schema import ChatMessage
from services.router.tokenization import RouterTokenizer
from tests.router.conftest import MODEL, Cluster
from tests.router.fake_workers import DEFAULT_REPLY, REPLIES, logprob_at


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> RouterTokenizer:
    return RouterTokenizer(model_dir)


def _tokens(tok: RouterTokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _chat_prompt_len(tok: RouterTokenizer, content: str) -> int:
    return len(tok.chat_prompt([ChatMessage(role="user", content=content)]))


def test_models(fakes: Cluster) -> None:
    models = fakes.client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert fakes.client.models.retrieve(MODEL).id == MODEL


def test_chat_greedy_text_and_usage(fakes: Cluster, tok: RouterTokenizer) -> None:
    content = "Say something [unicode] please (usage test)"
    out = fakes.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], temperature=0
    )
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion" and out.model == MODEL
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == REPLIES["unicode"]
    assert choice.finish_reason == "stop"
    assert out.usage is not None
    assert out.usage.prompt_tokens == _chat_prompt_len(tok, content)
    assert out.usage.completion_tokens == len(_tokens(tok, REPLIES["unicode"])) + 1  # eos counts
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens == 0
    # the router sent what the protocol says: Reserve, then Prefill naming the decode worker, then Decode
    req = fakes.prefill.requests[-1]
    assert req.decode_addr == fakes.decode.addr
    prompt = prompt_ids_of(req)
    assert len(prompt) == _chat_prompt_len(tok, content)
    assert len(req.prompt_ids_packed) == 4 * len(prompt)  # the prompt travels packed
    assert req.rid in fakes.decode.reserved and fakes.decode.reserved[req.rid].prompt_len == len(prompt)
    assert fakes.decode.decode_requests[-1].rid == req.rid
    assert prompt_ids_of(fakes.decode.decode_requests[-1]) == prompt
    assert req.sampling.temperature == 0 and req.sampling.max_tokens == 256 - len(prompt)


def test_cached_tokens_come_from_prefill(fakes: Cluster, tok: RouterTokenizer) -> None:
    content = "the same prompt twice (cache test)"
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": content}], temperature=0, max_tokens=3)
    first = fakes.client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    second = fakes.client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    n = _chat_prompt_len(tok, content)
    assert first.usage.prompt_tokens_details.cached_tokens < n - 1
    assert second.usage.prompt_tokens_details.cached_tokens == n - 1  # the fake caches all but the last
    by_tier = (second.usage.prompt_tokens_details.model_extra or {})["cached_tokens_by_tier"]
    assert by_tier == {"l1": n - 1 - (n - 1) // 2, "l2": (n - 1) // 2, "l3": 0}  # the fake has no L3
    metrics = fakes.http.get("/metrics").text
    assert re.search(r'swaserve_router_prompt_tokens_total\{source="l1"\} [1-9]', metrics)


def test_chat_stream_with_usage(fakes: Cluster, tok: RouterTokenizer) -> None:
    fakes.decode.chunk_size = 1  # one token per chunk: multi-byte characters split across chunks
    stream = fakes.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream [unicode]"}],
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == REPLIES["unicode"]
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 5  # really streamed, not one piece
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == len(_tokens(tok, REPLIES["unicode"])) + 1
    assert last.usage.prompt_tokens_details.cached_tokens is not None


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", ["STOP", ["nothing", "STOP"], ["three", "STOP"]])
def test_stop_strings_are_cut(fakes: Cluster, stream: bool, stop: str | list[str]) -> None:
    fakes.decode.chunk_size = 1
    expected = "one, two, " if "three" in stop else "one, two, three. "
    text, finish = _chat_text(fakes, "count [stops]", stream, stop=stop)
    assert (text, finish) == (expected, "stop")


def test_stop_string_the_worker_missed_is_cut_and_aborted(fakes: Cluster) -> None:
    fakes.decode.honour_stop = False  # the worker would go on: the router must cut and Abort
    fakes.decode.chunk_size = 3
    text, finish = _chat_text(fakes, "count [stops]", True, stop="STOP")
    assert (text, finish) == ("one, two, three. ", "stop")
    rid = fakes.decode.decode_requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)


def test_max_tokens_length_and_max_completion_tokens(fakes: Cluster, tok: RouterTokenizer) -> None:
    out = fakes.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "[long]"}], temperature=0, max_completion_tokens=5
    )
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5
    assert out.choices[0].message.content == tok.decode(_tokens(tok, REPLIES["long"])[:5])


def test_first_token_ends_request_without_decode(fakes: Cluster) -> None:
    before = len(fakes.decode.decode_requests)
    out = fakes.client.completions.create(model=MODEL, prompt="x", max_tokens=1, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.choices[0].finish_reason == "length"
    assert out.choices[0].text == "Hello"
    assert out.usage.completion_tokens == 1
    assert len(fakes.decode.decode_requests) == before  # never decoded ...
    rid = fakes.prefill.requests[-1].rid
    _eventually(lambda: rid in fakes.decode.aborted)  # ... and the reservation was released


def test_n_greedy_choices_are_identical(fakes: Cluster) -> None:
    out = fakes.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0, n=3
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert {c.message.content for c in out.choices} == {DEFAULT_REPLY}
    assert out.usage.completion_tokens == 3 * (out.usage.completion_tokens // 3)


def test_seed_reaches_the_worker_and_n_uses_seed_plus_index(fakes: Cluster) -> None:
    out = fakes.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0.7, seed=40, n=2
    )
    assert [c.message.content for c in out.choices] == [f"{DEFAULT_REPLY} #40", f"{DEFAULT_REPLY} #41"]
    again = fakes.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0.7, seed=40, n=2
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    sampling = fakes.prefill.requests[-1].sampling
    assert sampling.top_p == pytest.approx(1.0) and sampling.temperature == pytest.approx(0.7)


def test_n_streaming_completions_interleave_by_index(fakes: Cluster) -> None:
    fakes.decode.chunk_size = 1
    stream = fakes.client.completions.create(
        model=MODEL, prompt="x", temperature=1.0, seed=7, n=3, max_tokens=40, stream=True
    )
    texts = {0: "", 1: "", 2: ""}
    finishes = {}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts == {i: f"{DEFAULT_REPLY} #{7 + i}" for i in range(3)}
    assert finishes == {0: "stop", 1: "stop", 2: "stop"}


@pytest.mark.parametrize(
    "prompt_kind",
    ["text", "texts", "ids", "id_lists"],
)
def test_completion_prompt_forms(fakes: Cluster, tok: RouterTokenizer, prompt_kind: str) -> None:
    a, b = "first [long]", "second [unicode]"
    prompt: object = {
        "text": a,
        "texts": [a, b],
        "ids": tok.encode(a),
        "id_lists": [tok.encode(a), tok.encode(b)],
    }[prompt_kind]
    out = fakes.client.completions.create(model=MODEL, prompt=prompt, n=2, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    n_prompts = 2 if prompt_kind in ("texts", "id_lists") else 1
    assert [c.index for c in out.choices] == list(range(2 * n_prompts))
    assert out.choices[0].text == out.choices[1].text == tok.decode(_tokens(tok, REPLIES["long"])[:6])
    if n_prompts == 2:
        assert out.choices[2].text == tok.decode(_tokens(tok, REPLIES["unicode"])[:6])
    assert out.usage.prompt_tokens == len(tok.encode(a)) + (len(tok.encode(b)) if n_prompts == 2 else 0)
    assert out.usage.completion_tokens == 6 * 2 * n_prompts


def test_chat_logprobs(fakes: Cluster) -> None:
    out = fakes.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "[stops]"}],
        temperature=0,
        logprobs=True,
        max_tokens=6,
    )
    content = out.choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx([logprob_at(k) for k in range(6)])
    assert "".join(e.token for e in content) == out.choices[0].message.content
    assert all(e.top_logprobs == [] for e in content)
    assert bytes(b for e in content for b in e.bytes).decode() == out.choices[0].message.content


def test_completion_logprobs_streamed(fakes: Cluster) -> None:
    stream = fakes.client.completions.create(
        model=MODEL, prompt="[long]", temperature=0, logprobs=1, max_tokens=5, stream=True
    )
    tokens: list[str] = []
    lps: list[float] = []
    text = ""
    for c in stream:
        text += c.choices[0].text
        if c.choices[0].logprobs:
            tokens += c.choices[0].logprobs.tokens
            lps += c.choices[0].logprobs.token_logprobs
    assert "".join(tokens) == text and len(lps) == 5
    assert lps == pytest.approx([logprob_at(k) for k in range(5)])


def test_health_and_metrics(fakes: Cluster) -> None:
    health = fakes.http.get("/health").json()
    assert health == {"status": "ok", "prefill_workers": 1, "decode_workers": 1}
    metrics = fakes.http.get("/metrics").text
    for name in (
        "swaserve_router_requests_total",
        "swaserve_router_ttft_seconds_bucket",
        "swaserve_router_tpot_seconds_bucket",
        "swaserve_router_e2e_latency_seconds_bucket",
        "swaserve_router_inflight_requests",
    ):
        assert name in metrics
    assert re.search(
        r'swaserve_router_requests_total\{endpoint="/v1/chat/completions",status="200"\} [1-9]', metrics
    )
    assert "swaserve_router_inflight_requests 0.0" in metrics


def _chat_text(fakes: Cluster, content: str, stream: bool, **kw: object) -> tuple[str, str | None]:
    messages = [{"role": "user", "content": content}]
    if not stream:
        out = fakes.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)  # type: ignore[call-overload]
        return out.choices[0].message.content, out.choices[0].finish_reason
    text, finish = "", None
    for c in fakes.client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, stream=True, **kw
    ):  # type: ignore[call-overload]
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
    return text, finish


def _eventually(cond: object, timeout: float = 3.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
