"""A real local cluster (redis-server, router, prefill and decode processes) started by `swaserve up`,
driven with the official openai client and raw HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.models.model_store import resolve_model
from tests.integration.up_cluster import swaserve_up

MODEL = "mimo-tiny"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("cluster") / "up.log"
    with swaserve_up(log, "--model", MODEL, prefill_workers=1) as base:
        yield base


@pytest.fixture(scope="module")
def client(cluster: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{cluster}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine_alone() -> Engine:
    return Engine.from_dir(resolve_model(MODEL), EngineConfig())


def _alone(engine: Engine, prompt_ids: list[int], max_tokens: int) -> list[int]:
    (req,) = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    return req.output_ids


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("n_prompt", [5, 300])  # shorter and longer than the window (128)
def test_greedy_completion_equals_the_engine_alone(client, engine_alone, n_prompt):
    prompt_ids = [(i * 7919) % 150_000 for i in range(1, n_prompt + 1)]
    r = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}, logprobs=1)
    expected = engine_alone.decode_ids(_alone(engine_alone, prompt_ids, 12))
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens == 12


def test_chat_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello"}], max_tokens=8, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens >= 1
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello"}],
                                          max_tokens=8, temperature=0)
    assert full.choices[0].message.content == text


def test_repeated_prompt_reports_cached_tokens(client):
    prompt_ids = [(i * 104729) % 150_000 for i in range(1, 200)]
    client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=2, temperature=0)
    r = client.completions.create(model=MODEL, prompt=prompt_ids, max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens_details is not None
    assert r.usage.prompt_tokens_details.cached_tokens >= 128


def test_n_and_stop(client):
    r = client.completions.create(model=MODEL, prompt="One two", max_tokens=6, temperature=0, n=3)
    assert len(r.choices) == 3 and len({c.text for c in r.choices}) == 1
    text = r.choices[0].text
    if len(text) > 2:
        stop = text[1:3]
        s = client.completions.create(model=MODEL, prompt="One two", max_tokens=6, temperature=0, stop=[stop])
        assert stop not in s.choices[0].text and s.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    "body, status",
    [
        ({"model": "nope", "prompt": "x"}, 404),
        ({"model": MODEL, "prompt": "x", "max_tokens": -1}, 400),
        ({"model": MODEL, "prompt": "x", "temperature": "hot"}, 400),
        ({"model": MODEL}, 400),
        ({"model": MODEL, "prompt": [1] * 5000}, 400),
    ],
)
def test_bad_requests_get_4xx_and_the_cluster_keeps_serving(cluster, client, body, status):
    r = httpx.post(f"{cluster}/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and "Traceback" not in err["message"]
    ok = client.completions.create(model=MODEL, prompt="still there?", max_tokens=2, temperature=0)
    assert ok.choices[0].text is not None


def test_malformed_json_is_a_400(cluster):
    r = httpx.post(f"{cluster}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_metrics_are_exported(cluster):
    text = httpx.get(f"{cluster}/metrics", timeout=10).text
    assert "swaserve_router_" in text


