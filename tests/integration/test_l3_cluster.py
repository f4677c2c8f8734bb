"""L3 end to end: `swaserve up --gcache 1` with two prefill workers whose device pools and host
tiers are too small for the conversations (mimo-tiny): later turns get their prefix back from the
GCache node, the usage says so per tier, and every answer is the one a cluster without any prefix
cache gives."""

from __future__ import annotations

import random
from collections.abc import Iterator

import openai
import pytest

from tests.integration.up_cluster import swaserve_up, tiered_turns

MODEL = "mimo-tiny"


@pytest.fixture(scope="module")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    logs = tmp_path_factory.mktemp("l3")
    tiered = ("--prefill", "2", "--gcache", "1", "--prefill-args=--max-total-tokens 512 --host-kv-tokens 256")
    plain = ("--prefill-args=--no-prefix-cache",)
    with (
        swaserve_up(logs / "l3.log", "--model", MODEL, *tiered, prefill_workers=2) as a,
        swaserve_up(logs / "plain.log", "--model", MODEL, *plain) as b,
    ):
        yield (openai.OpenAI(base_url=f"{a}/v1", api_key="-"), openai.OpenAI(base_url=f"{b}/v1", api_key="-"))


def test_later_turns_come_back_from_gcache_with_the_same_answer(clients) -> None:
    tiered, plain = clients
    rng = random.Random(8)
    convs = [[rng.randrange(100, 100_000) for _ in range(160 + 16 * i)] for i in range(6)]
    # six conversations of 160-260 tokens fit neither two 512-token device pools nor two 256-token
    # host tiers: later turns' prefixes come back from one of the three tiers, whichever worker
    tiers = tiered_turns(tiered, plain, MODEL, convs, turns=3, new_tokens=24, rng=rng)
    assert tiers["l3"] > 0, tiers
