"""Prediction accuracy in the router's metrics: the cached tokens a decision predicted on its prefill
worker against what that worker reported, through the real app against FAKE gRPC workers whose
cache is the prompts they saw (fake_workers.py) and a hand-filled index (fake_index.py), so that
the index and the workers can be made to disagree on purpose."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.common.block_hash import hash_blocks
from services.router.app import create_app
from services.router.policy import PolicyConfig
from services.router.workers import StaticWorkerPool
from tests.router.conftest import MODEL, RouterServer, router_settings
from tests.router.fake_index import FakeIndexSource, FakePrefixIndex
from tests.router.fake_workers import FakeDecodeWorker, FakePrefillWorker, ToyModel

PAGE = 16


def ids(n: int, start: int) -> list[int]:
    return list(range(start, start + n))


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


@pytest.fixture
def fleet(
    toy: ToyModel, model_dir: Path
) -> Iterator[tuple[list[FakePrefillWorker], FakeIndexSource, RouterServer]]:
    prefills = [FakePrefillWorker(toy).start() for _ in range(3)]
    decode = FakeDecodeWorker(toy).start()
    source = FakeIndexSource(FakePrefixIndex(PAGE, 32))
    pool = StaticWorkerPool([w.addr for w in prefills], [decode.addr])
    settings = router_settings(model_dir, policy=PolicyConfig(page_size=PAGE, window=32))
    router = RouterServer(create_app(settings, pool, index=source))
    yield prefills, source, router
    router.close()
    for w in prefills:
        w.stop()
    decode.stop()


def complete(router: RouterServer, prompt: list[int]) -> tuple[int, int | None]:
    """(status, the usage's cached tokens)"""
    with router.http() as h:
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    if r.status_code != 200:
        return r.status_code, None
    return 200, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_phantom_exact_and_missed_hits_are_counted_once_per_request(fleet) -> None:
    prefills, source, router = fleet
    a, c, retried = ids(97, 1000), ids(70, 5000), ids(64, 3000)
    # the index says worker 1 holds a's 6 full pages, which that worker has never seen: a phantom
    source.index.store(prefills[1].addr, hash_blocks(a, PAGE))
    assert complete(router, a) == (200, 0)  # predicted 96, reported 0: phantom
    assert complete(router, a) == (200, 96)  # predicted 96, reported 96 (the last token is computed)
    assert complete(router, c) == (200, 0)  # predicted 0, reported 0
    assert complete(router, c) == (200, 69)  # the index never heard of c: predicted 0, reported 69
    # a first attempt that fails is not counted: its decision (48 tokens on worker 0) never answered
    source.index.store(prefills[0].addr, hash_blocks(retried, PAGE))
    prefills[0].fail_with = grpc.StatusCode.UNAVAILABLE
    assert complete(router, retried) == (200, 0)  # the retry, on a worker without it: 0 against 0
    prefills[0].fail_with = None
    served = {w.addr: len(w.requests) - (w is prefills[0]) for w in prefills}  # answered Prefills
    for w in prefills:  # a Prefill that answers "abort" fails the request: nothing to compare
        w.finish_override = "abort"
    assert complete(router, ids(40, 9000))[0] >= 500
    for w in prefills:
        w.finish_override = ""
    with router.http() as h:
        text = h.get("/metrics").text

    assert metric(text, "swaserve_router_predicted_cached_error_tokens_count") == 5
    assert metric(text, 'swaserve_router_predicted_cached_error_tokens_bucket{le="-16.0"}') == 1
    assert metric(text, 'swaserve_router_predicted_cached_error_tokens_bucket{le="-1.0"}') == 1
    assert metric(text, 'swaserve_router_predicted_cached_error_tokens_bucket{le="0.0"}') == 4
    assert metric(text, 'swaserve_router_predicted_cached_error_tokens_bucket{le="64.0"}') == 4
    assert metric(text, 'swaserve_router_predicted_cached_error_tokens_bucket{le="256.0"}') == 5
    assert metric(text, "swaserve_router_predicted_cached_tokens_total") == 96 + 96
    assert metric(text, "swaserve_router_reported_cached_tokens_total") == 96 + 69
    assert metric(text, "swaserve_router_predicted_cached_abs_error_tokens_total") == 96 + 69
    assert metric(text, "swaserve_router_prediction_prompt_tokens_total") == 97 + 97 + 70 + 70 + 64
    assert metric(text, "swaserve_router_phantom_hits_total") == 1
    assert metric(text, "swaserve_router_missed_hits_total") == 1
    assert metric(text, "swaserve_router_predicted_cached_error_fraction_sum") == pytest.approx(
        96 / 97 + 69 / 70
    )
    per_worker = {
        w.addr: metric(text, f'swaserve_router_prefill_requests_total{{worker="{w.addr}"}}')
        if f'worker="{w.addr}"' in text
        else 0.0
        for w in prefills
    }
    assert per_worker == served and served[prefills[1].addr] >= 2 and sum(served.values()) == 5
