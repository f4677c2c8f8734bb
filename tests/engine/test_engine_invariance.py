"""The engine (paged pools, radix cache, chunked prefill, batching, preemption) against a plain
re-computation of the whole sequence with no cache: same greedy tokens, same logits (1e-4)."""

from __future__ import annotations

import random

import pytest
import torch

from services.common.sampling_params import SamplingParams
from services.engine.engine import Engine, EngineConfig
from tests.engine.tiny_models import llama_dict, mimo_dict, random_model, reference_greedy, reference_logits

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.fixture(scope="module")
def mimo():
    return random_model(mimo_dict(window=8), seed=1)


@pytest.fixture(scope="module")
def llama():
    return random_model(llama_dict(), seed=2)


def _engine(model, **kw) -> Engine:
    return Engine(model, model.config, EngineConfig(**kw))


def _prompt(rng: random.Random, n: int, vocab: int = 250) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _capture(engine: Engine) -> dict[str, torch.Tensor]:
    first: dict[str, torch.Tensor] = {}
    engine.logits_hook = lambda req, lg: first.setdefault(req.rid, lg.clone())
    return first


@pytest.mark.parametrize("page_size, chunk", [(1, 512), (4, 3), (4, 16), (8, 5), (16, 64)])
@pytest.mark.parametrize("n", [5, 8, 9, 40])
def test_single_request_matches_recompute(mimo, page_size, chunk, n):
    prompt = _prompt(random.Random(n * 100 + chunk), n)
    eng = _engine(mimo, page_size=page_size, chunk_size=chunk, max_total_tokens=512)
    first = _capture(eng)
    (req,) = eng.generate([prompt], GREEDY)
    assert req.output_ids == reference_greedy(mimo, prompt, 12)
    assert _close(first[req.rid], reference_logits(mimo, prompt)[-1])


def test_llama_path_matches_recompute(llama):
    rng = random.Random(7)
    prompts = [_prompt(rng, n) for n in (3, 17, 60)]
    eng = _engine(llama, page_size=4, chunk_size=16)
    reqs = eng.generate(prompts, GREEDY)
    for p, r in zip(prompts, reqs, strict=True):
        assert r.output_ids == reference_greedy(llama, p, 12)


def test_batched_requests_of_mixed_lengths(mimo):
    rng = random.Random(3)
    prompts = [_prompt(rng, n) for n in (2, 7, 8, 9, 15, 33, 70, 4)]
    eng = _engine(mimo, page_size=4, chunk_size=8, max_batch_tokens=24)
    first = _capture(eng)
    reqs = eng.generate(prompts, GREEDY)
    for p, r in zip(prompts, reqs, strict=True):
        assert r.output_ids == reference_greedy(mimo, p, 12)
        assert _close(first[r.rid], reference_logits(mimo, p)[-1])


def test_prefix_cache_hits_give_the_same_output(mimo):
    rng = random.Random(11)
    base = _prompt(rng, 37)
    eng = _engine(mimo, page_size=4, chunk_size=16)
    (a,) = eng.generate([base], GREEDY)
    # a follow-up turn extends prompt + output; another extends only the prompt
    turn2 = base + a.output_ids + _prompt(rng, 6)
    branch = base + _prompt(rng, 5)
    first = _capture(eng)
    r2, r3 = eng.generate([turn2, branch], GREEDY)
    assert r2.cached_len >= 40 and r3.cached_len >= 36  # finish-point and prompt-end tails both hit
    for p, r in ((turn2, r2), (branch, r3)):
        assert r.output_ids == reference_greedy(mimo, p, 12)
        assert _close(first[r.rid], reference_logits(mimo, p)[-1])


def test_swa_tombstones_force_a_back_off_and_the_output_stays(mimo):
    rng = random.Random(5)
    base = _prompt(rng, 64)
    eng = _engine(mimo, page_size=4, chunk_size=64)
    eng.generate([base], GREEDY)
    longer = base + _prompt(rng, 3)
    raw_before = eng.cache.match(longer[:-1])
    assert raw_before.safe_len == 64
    eng.cache.evict_swa(eng.cache.evictable_swa_pages())  # tombstone every SWA page the cache holds
    after = eng.cache.match(longer[:-1])
    assert after.raw_len == 64 and after.safe_len < 64  # full KV still there, but not window-safe
    (r,) = eng.generate([longer], GREEDY)
    assert r.cached_len == after.safe_len
    assert r.output_ids == reference_greedy(mimo, longer, 12)


def test_a_shared_prefix_without_its_window_becomes_a_hit_for_the_third_request(mimo):
    """A and B share a 40-token system prompt; A's cache keeps SWA only at A's own end, so B finds
    the shared full KV but no window there (raw > safe). B's prefill stops at the branch point and
    caches it with the SWA tail it just computed: C, the third with that prefix, hits it."""
    rng = random.Random(13)
    system = _prompt(rng, 40)
    a, b, c = (system + _prompt(rng, n) for n in (23, 17, 29))
    eng = _engine(mimo, page_size=4, chunk_size=64)
    first = _capture(eng)
    (ra,) = eng.generate([a], GREEDY)
    m = eng.cache.match(b[:-1])
    assert m.raw_len == 40 and m.safe_len < 40  # the branch point has no SWA window
    (rb,) = eng.generate([b], GREEDY)
    assert rb.cached_len == m.safe_len
    (rc,) = eng.generate([c], GREEDY)
    assert rc.cached_len == 40  # B cached the branch point with its tail
    for p, r in ((a, ra), (b, rb), (c, rc)):
        assert r.output_ids == reference_greedy(mimo, p, 12)
        assert _close(first[r.rid], reference_logits(mimo, p)[-1])


def test_preemption_by_recompute_keeps_greedy_output(mimo):
    rng = random.Random(9)
    prompts = [_prompt(rng, n) for n in (30, 25, 20, 35)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # the full pool holds ~2 of these sequences at once: the others wait or get preempted
    eng = _engine(mimo, page_size=4, chunk_size=8, max_total_tokens=120, enable_prefix_cache=False)
    reqs = eng.generate(prompts, params)
    assert eng.scheduler.num_preemptions > 0
    for p, r in zip(prompts, reqs, strict=True):
        assert r.output_ids == reference_greedy(mimo, p, 24)
    assert eng.full_pool.num_used == 0 and eng.swa_pool.num_used == 0


def test_uncached_first_gives_the_same_outputs(mimo):
    rng = random.Random(13)
    prompts = [_prompt(rng, n) for n in (50, 3, 20)]
    eng = _engine(mimo, page_size=4, chunk_size=8, max_batch_tokens=8, queue_policy="uncached-first")
    reqs = eng.generate(prompts, GREEDY)
    for p, r in zip(prompts, reqs, strict=True):
        assert r.output_ids == reference_greedy(mimo, p, 12)


def test_pages_return_to_pools_or_cache(mimo):
    rng = random.Random(17)
    eng = _engine(mimo, page_size=4, chunk_size=16)
    eng.generate([_prompt(rng, n) for n in (10, 50, 90)], GREEDY)
    # with no request running, every used page is held by the radix cache alone
    assert eng.full_pool.num_used == eng.cache.total_full_pages()
    assert eng.swa_pool.num_used == eng.cache.total_swa_pages()
