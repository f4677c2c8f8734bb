"""Disaggregation inside one process: prefill on one engine, export the KV, decode on another."""

from __future__ import annotations

import random

import pytest

from services.common.kv_payload import KVPayload
from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from services.engine.kv.page_pool import OutOfPages
from services.engine.request import Req
from services.engine.sampling import Sampled
from tests.engine.tiny_models import llama_dict, mimo_dict, random_model, reference_greedy

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["mimo", "llama"])
def model(request):
    raw = mimo_dict(window=8) if request.param == "mimo" else llama_dict()
    return random_model(raw, seed=4)


def prefill(engine: Engine, prompt: list[int]) -> tuple[Req, KVPayload]:
    exported: list[KVPayload] = []
    engine.finish_hook = lambda req: exported.append(engine.export_kv(req))
    (req,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    return req, exported[0]


@pytest.mark.parametrize("n", [3, 8, 9, 50])
def test_decode_continues_exactly_where_prefill_stopped(model, n):
    prompt = [random.Random(n).randrange(250) for _ in range(n)]
    pre = Engine(model, model.config, EngineConfig(page_size=4, chunk_size=16))
    dec = Engine(model, model.config, EngineConfig(page_size=4, enable_prefix_cache=False))
    first, payload = prefill(pre, prompt)
    req = dec.add_prefilled(prompt, Sampled(first.output_ids[0], first.output_logprobs[0]), payload, GREEDY)
    dec.run()
    assert req.output_ids == reference_greedy(model, prompt, 16)


@pytest.mark.parametrize("n", [5, 8, 9, 50, 123])
def test_bytes_sent_match_the_geometry(model, n):
    cfg = model.config
    pre = Engine(model, cfg, EngineConfig(page_size=4))
    _, payload = prefill(pre, [1] * n)
    window = cfg.window or 0
    per_token = {"full": 0, "swa": 0}
    for g in cfg.kv_specs:
        per_token["full" if g.window is None else "swa"] += g.kv_heads * (g.k_dim + g.v_dim) * 4
    expected = n * per_token["full"] + min(n, window) * per_token["swa"]
    assert payload.nbytes == expected == payload.meta.nbytes
    if window:
        assert all(k.shape[0] == min(n, window) for k, m in zip(payload.k, payload.meta.layers, strict=True) if m.kind == "swa")


def test_a_full_decode_pool_refuses_and_keeps_nothing(model):
    pre = Engine(model, model.config, EngineConfig(page_size=4))
    first, payload = prefill(pre, list(range(40)))
    dec = Engine(model, model.config, EngineConfig(page_size=4, max_total_tokens=32, enable_prefix_cache=False))
    with pytest.raises(OutOfPages):
        dec.add_prefilled(list(range(40)), Sampled(first.output_ids[0], 0.0), payload, GREEDY)
    assert dec.full_pool.num_used == 0 and dec.swa_pool.num_used == 0 and not dec.has_work()


def test_kv_of_another_geometry_is_refused():
    a = random_model(mimo_dict(window=8), seed=1)
    b = random_model(mimo_dict(window=16), seed=1)
    first, payload = prefill(Engine(a, a.config, EngineConfig(page_size=4)), [5] * 20)
    dec = Engine(b, b.config, EngineConfig(page_size=4))
    with pytest.raises(ValueError, match="geometry or window"):
        dec.add_prefilled([5] * 20, Sampled(first.output_ids[0], 0.0), payload, GREEDY)


def test_seeded_sampling_continues_like_a_single_engine(model):
    prompt = [random.Random(1).randrange(250) for _ in range(20)]
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=1234, ignore_eos=True)
    alone = Engine(model, model.config, EngineConfig(page_size=4)).generate([prompt], params)[0].output_ids
    pre = Engine(model, model.config, EngineConfig(page_size=4))
    exported: list[KVPayload] = []
    pre.finish_hook = lambda req: exported.append(pre.export_kv(req))
    first = pre.generate([prompt], SamplingParams(max_tokens=1, temperature=1.0, seed=1234, ignore_eos=True))[0]
    dec = Engine(model, model.config, EngineConfig(page_size=4, enable_prefix_cache=False))
    req = dec.add_prefilled(prompt, Sampled(first.output_ids[0], 0.0), exported[0], params)
    dec.run()
    assert req.output_ids == alone
