"""The `affinity` prefill preset next to the seed: the partial credit of full-KV-only matches, the
heavier match weight, what each decides in the two cases the router comparison found (a conversation's
holder busy with one queued prompt; a holder with the full KV but not the window's SWA KV), and that
the seed's ranking is unchanged by the new fields."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from services.common.block_hash import hash_blocks
from services.router.policy import Candidate, PolicyConfig, PrefixHit, Profile, RouteRequest
from services.router.policy.config import policy_config_from_args
from services.router.policy.scorers import (
    AbsoluteLoadScorer,
    LoadScorer,
    PrefixMatchScorer,
    RawPrefixMatchScorer,
)

PAGE = 16
CFG = PolicyConfig(page_size=PAGE, window=128)


def cand(wid: str, queued: int = 0) -> Candidate:
    return Candidate(worker_id=wid, addr=wid, capacity_tokens=1 << 20, free_kv_tokens=1 << 20,
                     queued_tokens=queued, has_load=True)  # fmt: skip


def request(prompt_len: int, matches: dict[str, PrefixHit]) -> RouteRequest:
    ids = list(range(prompt_len))
    return RouteRequest(prompt_len=prompt_len, max_tokens=1, block_hashes=hash_blocks(ids[:-1], PAGE),
                        page_size=PAGE, key=b"k", matches=matches, index_usable=True)  # fmt: skip


def rank(cfg: PolicyConfig, req: RouteRequest, cands: list[Candidate]) -> tuple[str, dict[str, float]]:
    r = Profile.build("prefill", cfg.prefill_spec(), cfg).rank(req, cands)
    assert r.best is not None
    return r.best.worker_id, dict(r.scores)


@pytest.mark.parametrize(
    ("safe", "raw", "credit", "expected"),
    [(8, 8, 0.5, 0.5), (0, 8, 0.5, 0.25), (4, 12, 0.5, 0.5), (4, 12, 0.0, 0.25), (4, 12, 1.0, 0.75),
     (0, 0, 0.5, 0.0), (16, 16, 0.5, 1.0), (20, 30, 0.5, 1.0)],
)  # fmt: skip
def test_raw_credit_counts_full_kv_only_blocks_partly(
    safe: int, raw: int, credit: float, expected: float
) -> None:
    req = request(16 * PAGE + 1, {"w": PrefixHit(raw, safe)})  # 16 query pages
    assert req.query_blocks == 16
    scorer = RawPrefixMatchScorer(replace(CFG, raw_match_credit=credit))
    assert scorer.score(req, [cand("w"), cand("other")]) == pytest.approx([expected, 0.0])


def test_raw_credit_zero_is_the_seed_match_on_random_hits() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randrange(1, 40)
        hits = {}
        for w in "abc":
            raw = rng.randrange(0, n + 3)
            hits[w] = PrefixHit(raw, rng.randrange(0, raw + 1))
        req = request(n * PAGE + rng.randrange(1, PAGE + 1), hits)
        cands = [cand(w) for w in "abc"]
        seed = PrefixMatchScorer(CFG).score(req, cands)
        assert RawPrefixMatchScorer(replace(CFG, raw_match_credit=0.0)).score(req, cands) == pytest.approx(
            seed
        )
        full = RawPrefixMatchScorer(replace(CFG, raw_match_credit=1.0)).score(req, cands)
        assert full == pytest.approx(
            [min(hits[w].raw_blocks, req.query_blocks) / req.query_blocks for w in "abc"]
        )


def test_a_busy_holder_loses_under_the_seed_and_keeps_the_request_under_affinity() -> None:
    # a 13k-token next turn, 90% of it cached on the holder, which has one 12k prompt queued
    n = 13_000
    q = (n - 1) // PAGE
    hits = {"holder": PrefixHit(int(0.9 * q), int(0.9 * q)), "idle": PrefixHit(32, 32)}
    cands = [cand("holder", queued=12_000), cand("idle")]
    seed_best, seed = rank(replace(CFG, saturation_s=0.0), request(n, hits), cands)  # the two terms alone
    aff = replace(CFG, prefill_policy="affinity")
    aff_best, scores = rank(aff, request(n, hits), cands)
    assert seed_best == "idle" and aff_best == "holder"
    # the scores are the formulas: weight * fraction + 1 - load / max(loads, prompt)
    frac = int(0.9 * q) / q
    assert seed["holder"] == pytest.approx(frac + 1 - 12_000 / n)
    assert scores["holder"] == pytest.approx(2 * frac + 1 - 12_000 / n)
    assert scores["idle"] == pytest.approx(2 * 32 / q + 1)
    # with relative loads a holder whose match fraction beats the others' by more than 1 / weight
    # keeps its conversation whatever its backlog (as the seed does at weight 1 only for a full match)
    assert rank(aff, request(n, hits), [cand("holder", queued=200_000), cand("idle")])[0] == "holder"
    low = {"holder": PrefixHit(int(0.4 * q), int(0.4 * q)), "idle": PrefixHit(32, 32)}
    assert rank(aff, request(n, low), [cand("holder", queued=200_000), cand("idle")])[0] == "idle"


def test_a_full_kv_holder_wins_a_tie_of_window_safe_matches_only_under_affinity() -> None:
    # both hold the shared first 512 tokens safely; "conv" also holds the conversation's full KV
    n = 6_000
    hits = {"conv": PrefixHit(300, 32), "other": PrefixHit(32, 32)}
    cands = [cand("other", queued=300), cand("conv", queued=600)]
    plain = replace(CFG, saturation_s=0.0, seed_raw_credit=0.0)
    assert rank(plain, request(n, hits), cands)[0] == "other"  # the seed's terms see equal matches
    assert rank(replace(CFG, prefill_policy="affinity"), request(n, hits), cands)[0] == "conv"
    no_raw = replace(CFG, prefill_policy="affinity", raw_match_credit=0.0)
    assert rank(no_raw, request(n, hits), cands)[0] == "other"


def test_the_seed_preset_is_unchanged_by_the_affinity_fields() -> None:
    a = PolicyConfig(affinity_match_weight=5.0, raw_match_credit=1.0)
    assert a.prefill_spec() == PolicyConfig().prefill_spec()
    assert PolicyConfig().prefill_spec().scorers == (("prefix_match", 1.0), ("load", 1.0), ("sticky", 10.0))
    assert replace(CFG, prefill_policy="affinity").prefill_spec().scorers == (
        ("prefix_match_raw", 2.0), ("load", 1.0))  # fmt: skip


@pytest.mark.parametrize(
    "bad", [{"raw_match_credit": 1.5}, {"raw_match_credit": -0.1}, {"affinity_match_weight": -1}]
)
def test_bad_affinity_fields_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        PolicyConfig.from_dict(bad)


def test_flags_set_the_affinity_fields() -> None:
    import argparse

    from services.router.policy.config import add_policy_args

    p = argparse.ArgumentParser()
    add_policy_args(p)
    args = p.parse_args(
        ["--prefill-policy", "affinity", "--affinity-match-weight", "3", "--raw-match-credit", "0.25"]
    )
    cfg = policy_config_from_args(args, default_window=128)
    assert (cfg.prefill_policy, cfg.affinity_match_weight, cfg.raw_match_credit) == ("affinity", 3.0, 0.25)
    assert cfg.prefill_spec().scorers == (("prefix_match_raw", 3.0), ("load", 1.0))


def test_absolute_load_is_in_prompt_lengths_with_the_floor() -> None:
    cands = [cand("a", queued=50), cand("b", queued=400), cand("c")]
    assert AbsoluteLoadScorer(CFG).score(request(100, {}), cands) == pytest.approx([0.5, -3.0, 1.0])
    floored = AbsoluteLoadScorer(replace(CFG, load_floor_tokens=1000))
    assert floored.score(request(100, {}), cands) == pytest.approx([0.95, 0.6, 1.0])
    # the seed's load for the same candidates: relative to the busiest (400)
    assert LoadScorer(CFG).score(request(100, {}), cands) == pytest.approx([0.875, 0.0, 1.0])
