"""EngineLoop: the engine in one thread, requests from many; abort, failures, shutdown."""

from __future__ import annotations

import threading

import pytest

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.worker.engine_loop import EngineLoop, EngineStopped
from tests.engine.tiny_models import mimo_dict, random_model

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = [[(7 * i + j) % 250 for j in range(n)] for i, n in enumerate([5, 17, 40, 3])]


@pytest.fixture(scope="module")
def model():
    return random_model(mimo_dict(window=8), seed=3)


@pytest.fixture(scope="module")
def expected(model):
    engine = Engine(model, model.config, EngineConfig(page_size=4))
    return [r.output_ids for r in engine.generate(PROMPTS, GREEDY)]


@pytest.fixture
def loop(model):
    lp = EngineLoop(Engine(model, model.config, EngineConfig(page_size=4)), threads=1).start()
    yield lp
    lp.stop()


def all_pages_back(engine: Engine) -> bool:
    """No request holds pages: every full page is free or only the (unlocked) cache's."""
    return engine.full_pool.num_free + engine.cache.evictable_full_pages() == engine.full_pool.num_pages


def collect(handle):
    events = list(handle)
    tokens = [t for ev in events for t in ev.token_ids]
    return tokens, events[-1]


def test_requests_from_many_threads_match_the_engine_alone(loop, expected):
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        handle = loop.add_request(PROMPTS[i], GREEDY, rid=f"r{i}")
        tokens, last = collect(handle)
        assert last.finish_reason == "length" and last.completion_tokens == GREEDY.max_tokens
        results[i] = tokens

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [results[i] for i in range(len(PROMPTS))] == expected
    assert loop.stats.running == 0 and loop.stats.steps > 0 and loop.stats.alive


def test_bad_input_and_duplicate_ids_are_value_errors(loop):
    with pytest.raises(ValueError, match="token ids"):
        loop.add_request([999_999], GREEDY, rid="bad")
    loop.add_request([1, 2, 3], SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True), rid="dup")
    with pytest.raises(ValueError, match="already in flight"):
        loop.add_request([1, 2, 3], GREEDY, rid="dup")
    assert loop.abort("dup")


def test_abort_ends_one_request_and_spares_the_others(loop, expected):
    long = loop.add_request(
        [1, 2, 3], SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True), rid="long"
    )
    other = loop.add_request(PROMPTS[1], GREEDY, rid="other")
    long.next_events(timeout=10)  # it is running
    assert loop.abort("long") is True
    assert long.wait_finished(timeout=10).finish_reason == "abort"
    assert collect(other)[0] == expected[1]
    assert loop.abort("long") is False  # already gone
    assert all_pages_back(loop.engine)


def test_a_failing_step_fails_the_running_requests_and_the_loop_goes_on(loop, expected):
    runner = loop.engine.runner
    real_forward = runner.forward
    calls = {"n": 0}

    def flaky(batch, *args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_forward(batch, *args)

    runner.forward = flaky
    try:
        handle = loop.add_request(PROMPTS[2], GREEDY, rid="victim")
        tokens, last = collect(handle)
        assert last.error is not None and "boom" in last.error and last.finish_reason is None
        assert loop.stats.failed_steps == 1
        # the same prompt again: served in full, and the same tokens as without the failure
        assert collect(loop.add_request(PROMPTS[2], GREEDY, rid="after"))[0] == expected[2]
        assert all_pages_back(loop.engine)
    finally:
        runner.forward = real_forward


def test_on_finish_runs_before_release_and_its_errors_stay_with_its_request(loop):
    def export(engine, req):
        return engine.export_kv(req).meta.num_tokens

    ok = loop.add_request(
        PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0), rid="ok", on_finish=export
    )
    assert collect(ok)[1].result == len(PROMPTS[0])

    def broken(engine, req):
        raise KeyError("nope")

    bad = loop.add_request(
        PROMPTS[0], SamplingParams(max_tokens=1, temperature=0.0), rid="bad", on_finish=broken
    )
    last = collect(bad)[1]
    assert last.error is not None and "nope" in last.error
    assert all_pages_back(loop.engine)


def test_stop_fails_what_is_outstanding_and_refuses_new_work(model):
    lp = EngineLoop(Engine(model, model.config, EngineConfig(page_size=4)), threads=1).start()
    handle = lp.add_request(
        [1, 2, 3], SamplingParams(max_tokens=4000, temperature=0.0, ignore_eos=True), rid="x"
    )
    handle.next_events(timeout=10)
    lp.stop()
    assert handle.wait_finished(timeout=5).error == "engine stopped"
    assert not lp.alive and not lp.stats.alive
    with pytest.raises(EngineStopped):
        lp.add_request([1, 2], GREEDY, rid="late")
