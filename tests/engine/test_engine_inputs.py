"""Bad input to the engine: a clear ValueError naming the field, and nothing queued."""

from __future__ import annotations

import math
import random

import pytest

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from tests.engine.reference_model import greedy_generate
from tests.engine.tiny_models import mimo_dict, random_model


@pytest.fixture(scope="module")
def model():
    return random_model(mimo_dict(window=16, max_position_embeddings=64), seed=3)


@pytest.mark.parametrize(
    "prompt, match",
    [
        ([], "at least one token"),
        ([1, 2, 300], r"token ids must be integers in \[0, 256\)"),
        ([1, -1], "token ids"),
        ([1.5], "token ids"),
        (list(range(64)), "context is 64"),
    ],
)
def test_bad_prompts(model, prompt, match):
    eng = Engine(model, model.config, EngineConfig(page_size=4))
    with pytest.raises(ValueError, match=match):
        eng.add_request(prompt, SamplingParams())
    assert not eng.has_work()


def test_stop_strings_need_a_tokenizer(model):
    eng = Engine(model, model.config, EngineConfig(page_size=4))
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        eng.add_request([1, 2], SamplingParams(stop=("x",)))


def test_a_prompt_beyond_the_pool_is_refused_not_truncated(model):
    eng = Engine(model, model.config, EngineConfig(page_size=4, max_total_tokens=16))
    with pytest.raises(ValueError, match="KV pool holds 16"):
        eng.add_request(list(range(20)), SamplingParams())


def test_generation_stops_at_the_context_with_length(model):
    eng = Engine(model, model.config, EngineConfig(page_size=4))
    (req,) = eng.generate([list(range(60))], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    assert req.finish_reason is not None and req.finish_reason.value == "length"
    assert req.seq_len == 64


@pytest.mark.parametrize("cfg, field", [({"dtype": "int8"}, "dtype"), ({"max_total_tokens": 2}, "max_total_tokens")])
def test_bad_engine_config(cfg, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**cfg)


def _ten_thousand(check_output: bool) -> None:
    model = random_model(mimo_dict(window=16, vocab=64, max_position_embeddings=20_000), seed=5)
    eng = Engine(model, model.config, EngineConfig(page_size=4, chunk_size=1024, max_batch_tokens=1024,
                                                   max_total_tokens=10_240, enable_prefix_cache=False))
    prompt = [random.Random(0).randrange(60) for _ in range(10_000)]
    req = eng.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    peak = 0
    while eng.has_work():
        eng.step()
        if req.pages is not None:
            peak = max(peak, len(req.pages.swa), eng.swa_pool.num_used)
    assert peak <= math.ceil(16 / 4) + 1
    assert len(req.output_ids) == 8
    if check_output:
        assert req.output_ids == greedy_generate(model, [prompt], 8)[0]


def test_ten_thousand_tokens_hold_a_window_of_swa_pages():
    """A 10,000-token prompt through the real engine: the request never holds more than
    ceil(window / page) + 1 SWA pages at any step."""
    _ten_thousand(check_output=False)


@pytest.mark.slow
def test_ten_thousand_tokens_output_equals_dense_reference():
    _ten_thousand(check_output=True)
