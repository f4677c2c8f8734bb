"""Fixtures: the real SmolLM2 tokenizer, FAKE gRPC workers, and the router served by uvicorn in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from tokenizers import Tokenizer

from services.models.model_store import resolve_model
from services.router.app import create_app
from services.router.settings import RouterSettings
from services.router.workers import StaticWorkerPool, WorkerPool
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel

MODEL = "smollm2"
MAX_CONTEXT = 256  # small, so that context-limit tests need few tokens


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def toy(model_dir: Path) -> ToyModel:
    return ToyModel(Tokenizer.from_file(str(model_dir / "tokenizer.json")), eos_id=2)


class RouterServer:
    """uvicorn serving an app on a free port, in a thread of this process."""

    def __init__(self, app: FastAPI) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "router did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0, timeout=20)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=20)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def router_settings(model_dir: Path, **kw: object) -> RouterSettings:
    base: dict[str, object] = dict(
        model_dir=model_dir,
        served_model=MODEL,
        max_context=MAX_CONTEXT,
        abort_timeout_s=1.0,
        prefill_timeout_s=10.0,
    )
    return RouterSettings(**{**base, **kw})  # type: ignore[arg-type]


def serve_router(model_dir: Path, pool: WorkerPool, **settings: object) -> RouterServer:
    return RouterServer(create_app(router_settings(model_dir, **settings), pool))


@dataclass
class Cluster:
    prefill: FakePrefillWorker
    decode: FakeDecodeWorker
    router: RouterServer
    client: openai.OpenAI
    http: httpx.Client


@pytest.fixture(scope="module")
def cluster(toy: ToyModel, model_dir: Path) -> Iterator[Cluster]:
    prefill = FakePrefillWorker(toy).start()
    decode = FakeDecodeWorker(toy).start()
    router = serve_router(model_dir, StaticWorkerPool([prefill.addr], [decode.addr]))
    http = router.http()
    try:
        yield Cluster(prefill, decode, router, router.client(), http)
    finally:
        http.close()
        router.close()
        prefill.stop()
        decode.stop()


@pytest.fixture
def fakes(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, with the fakes' failure knobs reset after the test."""
    yield cluster
    cluster.prefill.reset()
    cluster.decode.reset()
