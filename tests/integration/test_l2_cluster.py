"""The host tier (L2) end to end (`swaserve up` with mimo-tiny; the prefill worker's device pool is
kept small with --max-total-tokens so that conversations evict each other): later turns get their
prefix back from host memory, the usage says so per tier, and the answer is the one a cluster
without any prefix cache gives."""

from __future__ import annotations

import random
from collections.abc import Iterator

import openai
import pytest

from tests.integration.up_cluster import swaserve_up, tiered_turns

MODEL = "mimo-tiny"


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    logs = tmp_path_factory.mktemp("l2")
    l2 = ("--prefill-args=--max-total-tokens 512 --host-kv-tokens 16384",)
    plain = ("--prefill-args=--no-prefix-cache",)
    with (
        swaserve_up(logs / "l2.log", "--model", MODEL, *l2) as a,
        swaserve_up(logs / "plain.log", "--model", MODEL, *plain) as b,
    ):
        yield (openai.OpenAI(base_url=f"{a}/v1", api_key="-"), openai.OpenAI(base_url=f"{b}/v1", api_key="-"))


def test_later_turns_come_back_from_host_memory_with_the_same_answer(clients) -> None:
    tiered, plain = clients
    rng = random.Random(4)
    convs = [[rng.randrange(100, 100_000) for _ in range(150 + 20 * i)] for i in range(4)]
    # 4 conversations of 150-240 tokens do not fit 512 device tokens: the previous turn's
    # window-safe prefix came back, mostly from host memory
    l2_tokens = tiered_turns(tiered, plain, MODEL, convs, turns=2, new_tokens=30, rng=rng)["l2"]
    assert l2_tokens > 0
