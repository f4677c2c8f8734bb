"""The routing policy's plugins, one table each: window-safe match, seed formula, cost, decode
selection, length buckets, health, tie-breaks, profiles composed from config."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.block_hash import hash_blocks
from services.router.policy import Candidate, PolicyConfig, PrefixHit, Profile, ProfileSpec, RouteRequest
from services.router.policy.base import Filter, Scorer, Trace
from services.router.policy.config import LengthBucket, TierCredit, parse_buckets, parse_tier_credit
from services.router.policy.filters import FitsFilter, HealthFilter, LengthBucketFilter
from services.router.policy.pick import MaxScorePicker, tiebreak
from services.router.policy.scorers import (
    CostScorer,
    FreeKVScorer,
    LoadScorer,
    PrefixMatchScorer,
    RunningScorer,
)
from tests.router.fake_index import FakePrefixIndex

PAGE, WINDOW = 16, 32  # the window spans 2 pages
CFG = PolicyConfig(page_size=PAGE, window=WINDOW)


def cand(wid: str, role: str = "prefill", **kw: object) -> Candidate:
    base: dict[str, object] = dict(capacity_tokens=100_000, free_kv_tokens=100_000, has_load=True)
    return Candidate(worker_id=wid, addr=wid, role=role, **{**base, **kw})  # type: ignore[arg-type]


def request(prompt_len: int, matches: dict[str, PrefixHit] | None = None, **kw: object) -> RouteRequest:
    base: dict[str, object] = dict(
        prompt_len=prompt_len,
        max_tokens=0,
        block_hashes=hash_blocks(list(range(prompt_len)), PAGE),
        page_size=PAGE,
        key=b"k",
        matches=matches or {},
        index_usable=True,
    )
    return RouteRequest(**{**base, **kw})  # type: ignore[arg-type]


# -- window-safe prefix match --------------------------------------------------------------------
PROMPT = list(range(1000, 1000 + 8 * PAGE + 5))  # 8 full pages and a partial one
PAGES = hash_blocks(PROMPT, PAGE)


@pytest.mark.parametrize(
    ("case", "full_pages", "tombstoned", "raw", "safe"),
    [
        ("whole prefix with its SWA tail", 8, [], 8, 8),
        ("whole prefix, SWA tail page tombstoned", 8, [7], 8, 7),
        ("whole prefix, both window pages tombstoned", 8, [6, 7], 8, 6),
        ("SWA dropped in the middle only", 8, [2, 3], 8, 8),
        ("every SWA page tombstoned", 8, list(range(8)), 8, 0),
        ("half the prefix", 4, [], 4, 4),
        ("nothing", 0, [], 0, 0),
    ],
)
def test_prefix_match_is_window_safe(
    case: str, full_pages: int, tombstoned: list[int], raw: int, safe: int
) -> None:
    index = FakePrefixIndex(PAGE, WINDOW)
    index.store("w", PAGES[:full_pages])
    index.tombstone("w", [PAGES[i] for i in tombstoned])
    m = index.match(PAGES)["w"]
    assert (m.raw_blocks, m.safe_blocks) == (raw, safe), case
    req = request(len(PROMPT), {"w": PrefixHit(m.raw_blocks, m.safe_blocks)}, block_hashes=PAGES)
    (fraction,) = PrefixMatchScorer(CFG).score(req, [cand("w")])
    assert fraction == pytest.approx(safe / 8), case  # raw pages never count as hits


def test_tombstoned_tail_is_a_partial_hit_and_loses_to_the_tail_holder() -> None:
    index = FakePrefixIndex(PAGE, WINDOW)
    index.store("tail", PAGES)
    index.store("tomb", PAGES)
    index.tombstone("tomb", PAGES[-1:])
    hits = {w: PrefixHit(m.raw_blocks, m.safe_blocks) for w, m in index.match(PAGES).items()}
    req = request(len(PROMPT), hits, block_hashes=PAGES)
    scores = PrefixMatchScorer(CFG).score(req, [cand("tail"), cand("tomb")])
    assert scores == [1.0, pytest.approx(7 / 8)]
    ranking = Profile.build("p", CFG.prefill_spec(), CFG).rank(req, [cand("tomb"), cand("tail")])
    assert [c.worker_id for c in ranking.ordered] == ["tail", "tomb"]


def test_no_match_when_the_index_is_not_usable_or_the_prompt_has_no_full_page() -> None:
    hit = {"w": PrefixHit(8, 8)}
    assert PrefixMatchScorer(CFG).score(request(8 * PAGE, hit, index_usable=False), [cand("w")]) == [0.0]
    assert PrefixMatchScorer(CFG).score(request(PAGE - 1, hit), [cand("w")]) == [0.0]


# -- the seed formula: match_weight * safe_fraction - normalized_load ----------------------------
@pytest.mark.parametrize(
    ("match_weight", "prompt_len", "workers", "expected"),
    [
        # workers: (safe_blocks, queued_tokens, running_tokens); prompt of 8 pages = 128 tokens
        (1.0, 128, [(8, 0, 0), (0, 0, 0)], [1.0, 0.0]),
        (1.0, 128, [(8, 256, 0), (0, 0, 0)], [0.0, 0.0]),  # holder is the busiest: a tie
        (2.0, 128, [(8, 256, 0), (0, 0, 0)], [1.0, 0.0]),
        (1.0, 128, [(4, 0, 64), (0, 64, 0)], [0.5 - 0.5, -0.5]),  # floor = prompt_len (128)
        (1.0, 128, [(0, 100, 300), (2, 400, 0), (8, 0, 0)], [-1.0, 0.25 - 1.0, 1.0]),
    ],
)
def test_seed_formula(
    match_weight: float, prompt_len: int, workers: list[tuple[int, int, int]], expected: list[float]
) -> None:
    cfg = replace(CFG, match_weight=match_weight, saturation_s=0.0)  # the formula's two terms alone
    cands = [
        cand(f"w{i}", queued_tokens=q, capacity_tokens=1000, free_kv_tokens=1000 - r)
        for i, (_, q, r) in enumerate(workers)
    ]
    hits = {f"w{i}": PrefixHit(s, s) for i, (s, _, _) in enumerate(workers)}
    ranking = Profile.build("p", cfg.prefill_spec(), cfg).rank(request(prompt_len, hits), cands)
    seed = {w: total - 1.0 for w, total in ranking.scores.items()}  # the load scorer is 1 - load
    assert [seed[f"w{i}"] for i in range(len(workers))] == pytest.approx(expected)


def test_load_is_normalized_across_candidates_with_a_floor() -> None:
    cands = [cand("a", queued_tokens=50), cand("b", queued_tokens=200), cand("c")]
    assert LoadScorer(CFG).score(request(100, {}), cands) == pytest.approx([0.75, 0.0, 1.0])
    assert LoadScorer(CFG).score(request(400, {}), cands) == pytest.approx([0.875, 0.5, 1.0])
    floored = LoadScorer(replace(CFG, load_floor_tokens=1000))
    assert floored.score(request(100, {}), cands) == pytest.approx([0.95, 0.8, 1.0])
    unknown = [Candidate("a", "a"), Candidate("b", "b")]  # a static pool: no load, all equal
    assert LoadScorer(CFG).score(request(100, {}), unknown) == [1.0, 1.0]


# -- the cost scorer: predicted TTFT -------------------------------------------------------------
COST_CFG = replace(CFG, prefill_tokens_per_s=1000.0, tier_credit=TierCredit(1.0, 0.5, 0.25))


@pytest.mark.parametrize(
    ("case", "prompt_pages", "workers", "order"),
    [
        # workers: name -> (l1 safe pages, l2 pages, queued tokens, tokens_per_s label)
        ("idle beats queued", 10, {"a": (0, 0, 500, 0), "b": (0, 0, 0, 0)}, ["b", "a"]),
        ("hit beats miss", 10, {"a": (0, 0, 0, 0), "b": (10, 0, 0, 0)}, ["b", "a"]),
        ("hit loses to a long queue", 10, {"a": (10, 0, 400, 0), "b": (0, 0, 0, 0)}, ["b", "a"]),
        ("hit wins over a short queue", 10, {"a": (10, 0, 100, 0), "b": (0, 0, 0, 0)}, ["a", "b"]),
        ("L1 beats L2 beats nothing", 10, {"n": (0, 0, 0, 0), "l2": (0, 10, 0, 0), "l1": (10, 10, 0, 0)},
         ["l1", "l2", "n"]),
        ("a faster worker", 10, {"slow": (0, 0, 0, 0), "fast": (0, 0, 0, 4000)}, ["fast", "slow"]),
    ],
)  # fmt: skip
def test_cost_scorer_ordering(
    case: str, prompt_pages: int, workers: dict[str, tuple[int, int, int, int]], order: list[str]
) -> None:
    cands = [cand(w, queued_tokens=q, tokens_per_s=float(t)) for w, (_, _, q, t) in workers.items()]
    hits = {w: PrefixHit(l1, l1, l2) for w, (l1, l2, _, _) in workers.items()}
    req = request(prompt_pages * PAGE, hits)
    spec = ProfileSpec(("health",), (("cost", 1.0),))
    ranking = Profile.build("cost", spec, COST_CFG).rank(req, cands)
    assert [c.worker_id for c in ranking.ordered] == order, case
    assert max(ranking.scores.values()) == pytest.approx(1.0) and min(ranking.scores.values()) > 0


def test_cost_prediction_and_tier_credit() -> None:
    s = CostScorer(COST_CFG)
    prompt = 10 * PAGE  # 160 tokens
    req = request(prompt, {"l1": PrefixHit(4, 4), "l2": PrefixHit(4, 2, 6)}, l3_blocks=8)
    # l1: 4 pages L1 (64 tokens, credit 1) + L3 pages 4..8 (64 tokens, credit .25)
    assert s.cached_credit(req, cand("l1")) == pytest.approx(64 + 16)
    # l2: 2 pages L1 (32), L2 up to 6 (64 tokens at .5), L3 from 6 to 8 (32 tokens at .25)
    assert s.cached_credit(req, cand("l2")) == pytest.approx(32 + 32 + 8)
    assert s.predict_ttft(req, cand("l1", queued_tokens=920)) == pytest.approx((920 + 160 - 80) / 1000)
    full = request(prompt, {"w": PrefixHit(10, 10)})
    assert s.cached_credit(full, cand("w")) == prompt - 1  # the last token is always computed
    assert s.cached_credit(request(prompt, {"w": PrefixHit(10, 10)}, index_usable=False), cand("w")) == 0


# -- decode selection ----------------------------------------------------------------------------
def test_decode_selection_by_free_kv_and_running_requests() -> None:
    spec = CFG.decode_spec()
    profile = Profile.build("decode", spec, CFG)
    cands = [
        cand("roomy-busy", "decode", free_kv_tokens=8000, running=8),
        cand("roomy-idle", "decode", free_kv_tokens=8000, running=0),
        cand("tight-idle", "decode", free_kv_tokens=2000, running=0),
        cand("full", "decode", free_kv_tokens=50, running=0),  # cannot hold 100 + 50 tokens
    ]
    ranking = profile.rank(request(100, max_tokens=50), cands)
    assert [c.worker_id for c in ranking.ordered] == ["roomy-idle", "tight-idle", "roomy-busy"]
    assert ranking.notes["fits"] == "filtered"
    assert FreeKVScorer(CFG).score(request(1), cands) == pytest.approx([1.0, 1.0, 0.25, 50 / 8000])
    assert RunningScorer(CFG).score(request(1), cands) == pytest.approx([0.0, 1.0, 1.0, 1.0])


def test_decode_weights_come_from_config() -> None:
    cands = [cand("roomy-busy", "decode", free_kv_tokens=8000, running=4),
             cand("tight-idle", "decode", free_kv_tokens=4000, running=0)]  # fmt: skip
    by_room = replace(CFG, decode_running_weight=0.0)
    by_reqs = replace(CFG, decode_free_weight=0.0)
    first = {c: Profile.build("d", c.decode_spec(), c).rank(request(10), cands).ordered[0].worker_id
             for c in (by_room, by_reqs)}  # fmt: skip
    assert first == {by_room: "roomy-busy", by_reqs: "tight-idle"}


def test_fits_keeps_everyone_when_no_one_fits_and_ignores_unknown_load() -> None:
    f = FitsFilter(CFG)
    small = [cand("a", "decode", free_kv_tokens=10), cand("b", "decode", free_kv_tokens=20)]
    trace = Trace()
    assert f.apply(request(100, max_tokens=10), small, trace) == small
    assert trace.notes["fits"] == "none_fit"
    prefill = [
        cand("big", capacity_tokens=1000),
        cand("tiny", capacity_tokens=64),
        Candidate("static", "static"),
    ]
    kept = f.apply(request(100), prefill, Trace())
    assert [c.worker_id for c in kept] == ["big", "static"]


# -- length buckets ------------------------------------------------------------------------------
TINY = replace(CFG, buckets=parse_buckets("s:64,m:256,l:1K"))


@pytest.mark.parametrize(
    ("prompt_len", "workers", "chosen", "bucket", "fallback"),
    [
        (10, {"s1": "s", "m1": "m", "l1": "l"}, {"s1"}, "s", ""),
        (64, {"s1": "s", "m1": "m", "l1": "l"}, {"s1"}, "s", ""),
        (65, {"s1": "s", "m1": "m", "l1": "l"}, {"m1"}, "m", ""),
        (5000, {"s1": "s", "m1": "m", "l1": "l"}, {"l1"}, "l", ""),  # longer than every bucket
        (100, {"s1": "s", "l1": "l"}, {"l1"}, "l", "m"),  # equally near: the longer pool
        (10, {"l1": "l", "m1": "m"}, {"m1"}, "m", "s"),  # the nearest pool
        (10, {"l1": "l"}, {"l1"}, "l", "s"),
        (10, {"s1": "s", "s2": "s", "any": "", "m1": "m"}, {"s1", "s2", "any"}, "s", ""),
        (10, {"odd": "xl", "m1": "m"}, {"odd"}, "s", ""),  # an unknown bucket serves every length
        (10, {"x": "", "y": ""}, {"x", "y"}, "s", ""),  # no labels: the filter is a no-op
    ],
)
def test_length_bucket_filter(
    prompt_len: int, workers: dict[str, str], chosen: set[str], bucket: str, fallback: str
) -> None:
    trace = Trace()
    kept = LengthBucketFilter(TINY).apply(
        request(prompt_len), [cand(w, bucket=b) for w, b in workers.items()], trace
    )
    assert {c.worker_id for c in kept} == chosen
    assert trace.notes["bucket"] == bucket
    assert trace.notes.get("bucket_fallback", "") == fallback


def test_bucket_fallback_skips_unhealthy_workers() -> None:
    cands = [cand("s1", bucket="s", healthy=False), cand("m1", bucket="m"), cand("l1", bucket="l")]
    ranking = Profile.build("p", TINY.prefill_spec(), TINY).rank(request(10), cands)
    assert [c.worker_id for c in ranking.ordered] == ["m1"]
    assert dict(ranking.notes) == {"bucket": "m", "bucket_fallback": "s"}


def test_default_buckets_are_64k_256k_1m() -> None:
    assert [(b.name, b.max_tokens) for b in PolicyConfig().buckets] == [
        ("short", 65536), ("medium", 262144), ("long", 1048576),
    ]  # fmt: skip
    f = LengthBucketFilter(PolicyConfig())
    cands = [cand("s", bucket="short"), cand("m", bucket="medium"), cand("l", bucket="long")]
    for n, want in [(65536, "s"), (65537, "m"), (262145, "l")]:
        assert [c.worker_id for c in f.apply(request(n, block_hashes=()), cands, Trace())] == [want]


def test_health_filter_drops_unhealthy_and_other_models() -> None:
    cands = [cand("ok", model="m"), cand("sick", model="m", healthy=False), cand("other", model="x"),
             Candidate("static", "static")]  # fmt: skip
    kept = HealthFilter(CFG).apply(request(10, model="m"), cands, Trace())
    assert [c.worker_id for c in kept] == ["ok", "static"]
    assert len(HealthFilter(CFG).apply(request(10), cands, Trace())) == 3  # no model given: any


# -- picker: deterministic ties ------------------------------------------------------------------
def test_ties_are_broken_by_request_and_worker_not_by_history() -> None:
    picker = MaxScorePicker(CFG)
    cands = [cand(f"w{i}") for i in range(4)]
    tied = [0.5, 0.5 + 1e-12, 0.5, 0.5]  # float noise is a tie
    firsts: Counter[int] = Counter()
    for k in range(400):
        req = request(10, key=k.to_bytes(4, "big"))
        order = picker.order(req, cands, tied)
        assert order == picker.order(req, list(cands), list(tied))  # same question, same answer
        expected = sorted(range(4), key=lambda i: tiebreak(req.key, f"w{i}"))
        assert order == expected
        firsts[order[0]] += 1
    assert len(firsts) == 4 and min(firsts.values()) > 60  # spread over the tied workers
    assert picker.order(request(10), cands, [0.1, 0.9, 0.5, 0.9 - 1e-6])[:2] == [1, 3]


# -- configuration -------------------------------------------------------------------------------
def test_parsers() -> None:
    assert parse_buckets("a:64, b:256K ,c:1M") == (
        LengthBucket("a", 64), LengthBucket("b", 262144), LengthBucket("c", 1048576),
    )  # fmt: skip
    for bad in ["a:64,b:32", "a:64,a:128", "a64", "a:x", ""]:
        with pytest.raises(ValueError):
            parse_buckets(bad)
    assert parse_tier_credit("l2=0.5") == TierCredit(1.0, 0.5, 0.25)
    for bad in ["l4=1", "l1=2", "l1"]:
        with pytest.raises(ValueError):
            parse_tier_credit(bad)


def test_config_from_json_and_custom_profiles(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({
        "match_weight": 3.0,
        "buckets": [["s", "1K"], ["l", 4096]],
        "tier_credit": {"l2": 0.5},
        "prefill_profile": {"filters": ["health"], "scorers": [["load", 2.0]], "picker": "max_score"},
    }))  # fmt: skip
    cfg = PolicyConfig.from_json_file(path)
    assert cfg.match_weight == 3.0 and cfg.buckets == (LengthBucket("s", 1024), LengthBucket("l", 4096))
    assert cfg.tier_credit == TierCredit(l2=0.5)
    assert cfg.prefill_spec() == ProfileSpec(("health",), (("load", 2.0),))
    profile = Profile.build("p", cfg.prefill_spec(), cfg)
    assert [type(f).__name__ for f in profile.filters] == ["HealthFilter"]
    assert [(type(s.plugin).__name__, s.weight) for s in profile.scorers] == [("LoadScorer", 2.0)]
    seed = PolicyConfig(match_weight=3.0).prefill_spec()
    assert seed.scorers == (("prefix_match", 3.0), ("load", 1.0), ("sticky", 10.0))
    assert PolicyConfig(saturation_s=0).prefill_spec().scorers == (("prefix_match", 1.0), ("load", 1.0))
    assert PolicyConfig(prefill_policy="cost").prefill_spec().scorers == (("cost", 1.0),)


@pytest.mark.parametrize(
    "raw",
    [{"nope": 1}, {"page_size": 0}, {"prefill_policy": "magic"}, {"prefill_tokens_per_s": 0},
     {"match_weight": -1}, {"buckets": []}],
)  # fmt: skip
def test_bad_configs_are_refused(raw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PolicyConfig.from_dict(raw)


def test_plugins_register_by_name_and_unknown_names_fail() -> None:
    assert {"health", "fits", "length_bucket"} <= set(Filter.registry)
    assert {"prefix_match", "load", "cost", "free_kv", "running"} <= set(Scorer.registry)
    with pytest.raises(ValueError, match="unknown scorer"):
        Profile.build("p", ProfileSpec((), (("magic", 1.0),)), CFG)
    with pytest.raises(ValueError, match="registered twice"):

        class Again(Scorer):
            name = "load"

    class Constant(Scorer):  # a new scorer joins by subclassing; profiles can name it
        name = "test_constant"

        def score(self, req: RouteRequest, cands: object) -> list[float]:
            return [0.25 for _ in cands]  # type: ignore[attr-defined]

    try:
        spec = ProfileSpec((), (("test_constant", 2.0),))
        assert Profile.build("p", spec, CFG).rank(request(1), [cand("a")]).scores == {"a": 0.5}
    finally:
        del Scorer.registry["test_constant"]


# -- the seed's options chosen on traces (issue: the router wins on every trace) -------------------
def _ranked(cfg: PolicyConfig, req: RouteRequest, cands: list[Candidate]) -> list[str]:
    return [c.worker_id for c in Profile.build("prefill", cfg.prefill_spec(), cfg).rank(req, cands).ordered]


def test_host_tier_residency_counts_under_the_seed_when_credited() -> None:
    req = request(160, {"evicted": PrefixHit(raw_blocks=0, safe_blocks=0, l2_blocks=9)})
    cands = [cand("evicted", queued_tokens=40), cand("idle")]
    assert _ranked(replace(CFG, seed_l2_credit=True), req, cands)[0] == "evicted"
    assert (
        _ranked(replace(CFG, seed_l2_credit=False), req, cands)[0] == "idle"
    )  # without the credit: invisible
    assert _ranked(CFG, req, cands)[0] == "evicted"  # the default credits it
    s = PrefixMatchScorer(replace(CFG, seed_l2_credit=True)).score(req, cands)
    assert s[0] == pytest.approx(CFG.tier_credit.l2 * 9 / 10) and s[1] == 0  # 9 of the 10 pages
    l2, off = replace(CFG, seed_l2_credit=True), replace(CFG, seed_l2_credit=False)
    assert (
        Profile.build("prefill", l2.prefill_spec(), l2).reads_l2
        and not Profile.build("prefill", off.prefill_spec(), off).reads_l2
    )


def test_absolute_match_length_weighs_tokens_not_the_fraction() -> None:
    long_req = request(32_000, {"w": PrefixHit(30_000 // PAGE, 30_000 // PAGE)})
    short_req = request(320, {"w": PrefixHit(300 // PAGE, 300 // PAGE)})
    frac = PrefixMatchScorer(CFG)
    absolute = PrefixMatchScorer(replace(CFG, match_scale_tokens=32_000))
    w = [cand("w")]
    assert frac.score(long_req, w)[0] == pytest.approx(frac.score(short_req, w)[0], abs=0.05)
    assert absolute.score(long_req, w)[0] > 50 * absolute.score(short_req, w)[0]


@pytest.mark.parametrize(("holder_load", "winner"), [(50_000, "holder"), (200_000, "idle")])
def test_sticky_until_saturated(holder_load: int, winner: str) -> None:
    cfg = replace(CFG, saturation_s=1.0, prefill_tokens_per_s=100_000)
    req = request(1600, {"holder": PrefixHit(50, 50)})
    cands = [cand("holder", queued_tokens=holder_load), cand("idle")]
    assert _ranked(cfg, req, cands)[0] == winner
    plain = replace(CFG, saturation_s=0.0)
    assert _ranked(plain, req, cands)[0] == "idle"  # the seed's terms alone: the busiest candidate loses


def test_a_raw_match_is_credited_under_the_seed_only_when_asked() -> None:
    req = request(1600, {"sibling": PrefixHit(raw_blocks=80, safe_blocks=0)})
    cands = [cand("sibling", queued_tokens=100), cand("idle")]
    plain = replace(CFG, saturation_s=0.0)
    assert _ranked(replace(plain, seed_raw_credit=0.5), req, cands)[0] == "sibling"
    assert _ranked(replace(plain, seed_raw_credit=0.0), req, cands)[0] == "idle"


@pytest.mark.parametrize("load_norm", ["busiest", "prompt"])
def test_load_norm_measures_the_backlog_against_the_busiest_or_the_prompt(load_norm: str) -> None:
    req = request(1000)
    cands = [cand("a", queued_tokens=4000), cand("b", queued_tokens=2000)]
    s = LoadScorer(replace(CFG, load_norm=load_norm)).score(req, cands)
    assert s == ([0.0, 0.5] if load_norm == "busiest" else [-3.0, -1.0])
    with pytest.raises(ValueError):
        replace(CFG, load_norm="queue")


def test_cache_room_prefers_the_smallest_cache_and_is_off_by_default() -> None:
    from services.router.policy.scorers import CacheRoomScorer

    req = replace(request(160), cached_pages={"big": 900, "small": 100})
    cands = [cand("big"), cand("small"), cand("empty")]
    assert CacheRoomScorer(CFG).score(req, cands) == pytest.approx([0.0, 8 / 9, 1.0])
    assert "cache_room" not in dict(CFG.prefill_spec().scorers)
    assert dict(replace(CFG, cache_room_weight=0.5).prefill_spec().scorers)["cache_room"] == 0.5
