"""Cache-aware routing on a real local cluster (`swaserve up`: redis-server, router, 2 prefill and
1 decode worker of mimo-tiny): the next turn of a conversation goes back to the prefill worker that
holds its window-safe prefix, which the worker confirms by reporting those tokens as cached."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.integration.up_cluster import swaserve_up

MODEL = "mimo-tiny"
PAGE = 16  # the workers' and the router's default page size


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("routing") / "up.log"
    with swaserve_up(log, "--model", MODEL, "--prefill", "2", "--decode", "1", prefill_workers=2) as base:
        yield base


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_conversation_turns_return_to_the_worker_that_holds_them(cluster: str) -> None:
    rng = random.Random(11)
    convs = [[rng.randrange(100, 100_000) for _ in range(150 + 37 * i)] for i in range(4)]
    with httpx.Client(base_url=cluster, timeout=120) as h:
        assert _metric(h.get("/metrics").text, "swaserve_router_index_usable") == 1
        follow_ups = []
        for turn in range(3):
            for i, conv in enumerate(convs):
                prev = len(conv)
                if turn:
                    conv += [rng.randrange(100, 100_000) for _ in range(40)]  # the next user message
                r = h.post("/v1/completions", json={"model": MODEL, "prompt": conv, "max_tokens": 2})
                assert r.status_code == 200, r.text
                cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
                if turn:
                    follow_ups.append((i, turn, prev, cached))
            time.sleep(0.3)  # the KV events reach the router's index (normally within milliseconds)
        metrics = h.get("/metrics").text
    # every follow-up found (at least) the previous turn's page-aligned prompt on its worker
    for i, turn, prev, cached in follow_ups:
        assert cached >= prev // PAGE * PAGE - PAGE, (i, turn, prev, cached)
    assert _metric(metrics, 'swaserve_router_decisions_total{reason="cache_hit"}') >= len(follow_ups)
