"""Simulated workers of role `both` behind other routers, launched unchanged: sglang-router and
vllm-router in cache_aware mode in front of 2 simulated workers (one process, --count 2), driven
with the official openai client."""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from bench.sim.launch import SimFleet, sim_workers, stop
from bench.word_tokens import ids_to_text
from services.common.netutil import free_port

MODEL = "mimo-v2-flash-sim"
VLLM_ROUTER = Path(sys.executable).with_name("vllm-router")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimFleet]:
    log = tmp_path_factory.mktemp("sim-http") / "sim.log"
    with sim_workers("both", 2, "--model", MODEL, "--time-scale", "20", log=log) as f:
        yield f


def router_argv(kind: str, port: int, workers: list[str]) -> list[str]:
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers, "--policy", "cache_aware",
              "--prometheus-port", str(free_port())]  # fmt: skip
    if kind == "sglang":
        return [sys.executable, "-m", "sglang_router.launch_router", *common]
    return [str(VLLM_ROUTER), *common]


def available(kind: str) -> bool:
    if kind == "vllm":
        return VLLM_ROUTER.exists() or shutil.which("vllm-router") is not None
    try:
        import sglang_router  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(params=["sglang", "vllm"])
def router(request: pytest.FixtureRequest, fleet: SimFleet, tmp_path: Path) -> Iterator[str]:
    kind = request.param
    if not available(kind):
        pytest.skip(f"{kind}-router is not installed")
    port = free_port()
    log = tmp_path / f"{kind}-router.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(router_argv(kind, port, fleet.workers), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:  # ready once it routes a request
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "t1 t2", "max_tokens": 1},
                               timeout=5)  # fmt: skip
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield base
    finally:
        stop(proc)


def test_completions_through_the_router_have_the_right_length_and_hit_the_cache(router: str) -> None:
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=30)
    rng = random.Random(f"{router}")  # new prompts for each router (the fleet is shared)
    # lengths off the page grid: a repeat of a page-aligned prompt hits nothing (the engine keeps the SWA
    # tail of [n - 128, n) and must leave one token to compute, so it could only resume a page earlier)
    lengths = [810 + 100 * i for i in range(3)]
    prompts = [ids_to_text(rng.randrange(50_000) for _ in range(n)) for n in lengths]
    cached = {}
    for turn in range(2):
        for i, prompt in enumerate(prompts):
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=7)
            assert r.usage is not None and r.usage.completion_tokens == 7
            assert r.usage.prompt_tokens == lengths[i]
            assert len(r.choices[0].text.split()) == 7 and r.choices[0].finish_reason == "length"
            assert r.usage.prompt_tokens_details is not None
            cached[(turn, i)] = r.usage.prompt_tokens_details.cached_tokens
    assert [cached[(0, i)] for i in range(3)] == [0, 0, 0]
    # cache_aware sent each repeat to the worker holding the prompt: all but the last page is a hit
    assert [cached[(1, i)] for i in range(3)] == [(n - 1) // 16 * 16 for n in lengths]


def test_streamed_completion_through_the_router(router: str) -> None:
    client = openai.OpenAI(base_url=f"{router}/v1", api_key="unused", max_retries=0, timeout=30)
    stream = client.completions.create(model=MODEL, prompt="t5 t6 t7 t8", max_tokens=12, stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert len(text.split()) == 12 and all(w.startswith("t") for w in text.split())


def test_sglang_native_generate_through_the_router(router: str) -> None:
    body = {"input_ids": list(range(100, 400)), "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
    r = httpx.post(f"{router}/generate", json=body, timeout=30)
    if r.status_code == 404:  # vllm-router has no /generate route of its own
        pytest.skip("this router does not route /generate")
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 5 and out["meta_info"]["completion_tokens"] == 5
    assert out["meta_info"]["simulated"] is True
