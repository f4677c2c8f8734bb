"""Dispatcher.hold_aborts: Aborts wait for release() (or the safety timeout), then reach the worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.router.dispatch import Dispatcher
from services.router.policy import PolicyConfig
from services.router.routing import RoutingPipeline
from services.router.workers import StaticWorkerPool, WorkerClients
from tests.router.conftest import MODEL, Cluster, router_settings
from tests.router.fake_workers import FakeDecodeWorker, ToyModel


@pytest.fixture
def decode(toy: ToyModel) -> Iterator[FakeDecodeWorker]:
    w = FakeDecodeWorker(toy).start()
    yield w
    w.stop()


async def _until(cond, timeout: float = 5.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


def _run(model_dir: Path, decode: FakeDecodeWorker, body) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        clients = WorkerClients()
        pool = StaticWorkerPool([], [decode.addr])
        d = Dispatcher(router_settings(model_dir), pool, RoutingPipeline(PolicyConfig()), clients)
        try:
            await body(d)
            await d.drain()
        finally:
            await clients.close()

    asyncio.run(main())


def test_held_aborts_leave_on_release_and_others_at_once(model_dir: Path, decode: FakeDecodeWorker) -> None:
    async def body(d: Dispatcher) -> None:
        async def request() -> None:  # a task of its own, as a request is
            held = d.hold_aborts()
            d.abort_later("decode", decode.addr, "held")
            await asyncio.sleep(0.3)
            assert "held" not in decode.aborted
            held.release()
            await _until(lambda: "held" in decode.aborted)
            d.abort_later("decode", decode.addr, "after")  # released: at once
            await _until(lambda: "after" in decode.aborted)

        other = asyncio.ensure_future(request())
        d.abort_later("decode", decode.addr, "elsewhere")  # another context holds nothing
        await _until(lambda: "elsewhere" in decode.aborted)
        assert "held" not in decode.aborted
        await other

    _run(model_dir, decode, body)
    assert decode.aborted == ["elsewhere", "held", "after"]


def test_a_hold_never_released_lets_go_after_its_timeout(model_dir: Path, decode: FakeDecodeWorker) -> None:
    async def body(d: Dispatcher) -> None:
        async def request() -> None:
            d.hold_aborts(max_hold_s=0.2)
            d.abort_later("decode", decode.addr, "forgotten")

        await asyncio.ensure_future(request())
        waited = await _until(lambda: "forgotten" in decode.aborted)
        assert waited >= 0.1

    _run(model_dir, decode, body)


# -- through HTTP: held until the response left, then sent at once (well before the safety timeout)
def _abort_delay(fakes: Cluster, body: dict[str, object], status: int) -> float:
    """Seconds from the router's answer (`status`) to the decode worker's Abort of the request."""
    assert fakes.http.post("/v1/completions", json=body).status_code == status
    t0 = time.monotonic()
    rid = fakes.prefill.requests[-1].rid
    while rid not in fakes.decode.aborted:
        assert time.monotonic() - t0 < 5, "no Abort"
        time.sleep(0.005)
    return time.monotonic() - t0


def test_a_finished_requests_abort_follows_its_response(fakes: Cluster) -> None:
    delay = _abort_delay(fakes, {"model": MODEL, "prompt": "x", "max_tokens": 1}, 200)
    assert delay < 0.5  # released once sent, not by the 1 s safety net


def test_a_failed_requests_abort_is_released_with_the_error(fakes: Cluster) -> None:
    fakes.prefill.fail_with = grpc.StatusCode.INTERNAL
    delay = _abort_delay(fakes, {"model": MODEL, "prompt": "x", "max_tokens": 4}, 502)
    assert delay < 0.5
