"""Scorers: how good each candidate is for the request, in [0, 1], higher = better.

The seed policy (the default) is

    score = match_weight * prefix_match_fraction - normalized_load

spelled as two scorers, `prefix_match` (weight match_weight) and `load` (weight 1), which returns
1 - normalized_load: the sum is the seed score plus 1, so it ranks the same.

    prefix_match_fraction = safe_blocks / query_blocks        (window-safe: raw hits never count)
    normalized_load       = load / max(max load of the candidates, prompt_len, load_floor_tokens)
    load                  = queued_tokens + running_tokens    (as the worker last published them)

The prompt length in the normalizer keeps tiny loads tiny: a worker with 10 queued tokens is not
"fully loaded" next to an idle one when the request itself is 30k tokens.

The `affinity` preset (not the default; the seed stays as DESIGN.md states it) weighs the cache more
and credits full-KV-only matches partly:

    score = affinity_match_weight * (safe_blocks + raw_match_credit * (raw_blocks - safe_blocks))
            / query_blocks - normalized_load

A worker that holds a prefix's full-attention KV but not the window's SWA KV at its end (`raw`
beyond `safe`) is not a hit today, but it is where the conversation lives: its next turn's prefill
there leaves the prompt end (and the branch point) window-safe, so the turn after hits. A weight
above 1 counts a missed prefix as work the fleet does twice (the request's own prefill and the
duplicate cached copy), not only as this request's time. The load is the seed's (relative to
the busiest candidate). `load_abs` (1 - load / max(prompt_len, load_floor_tokens), loads in
prompt lengths) is there for profiles; in the window-128 comparison it made the holder lose
more often (a short next turn behind a long backlog), so the preset does not use it.

The cost scorer predicts time to first token on each worker:

    cached   = l1 * L1 + l2 * (L2 - L1)+ + l3 * (L3 - max(L1, L2))+     (tokens; credits by tier)
    ttft     = overhead + (queued_tokens + prompt_len - cached) / tokens_per_s
    score    = min ttft over the candidates / ttft                      (1 for the fastest)

Decode: `free_kv` (free KV tokens / the most free) and `running` (1 - requests / the most requests).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.router.policy.base import Candidate, RouteRequest, Scorer


def _match_fractions(
    req: RouteRequest,
    cands: Sequence[Candidate],
    raw_credit: float,
    l2_credit: float = 0.0,
    scale_tokens: int = 0,
) -> list[float]:
    """(window-safe blocks + raw_credit x full-KV-only blocks beyond them + l2_credit x host-tier
    blocks beyond both) / the prompt's blocks; with `scale_tokens` > 0, matched tokens / scale_tokens
    instead (absolute: a 30k-token hit outweighs a 300-token one whatever the prompts' lengths)."""
    n = req.query_blocks
    if n == 0 or not req.index_usable:
        return [0.0] * len(cands)
    denom = scale_tokens / req.page_size if scale_tokens > 0 else n
    out = []
    for c in cands:
        hit = req.hit(c)
        safe = min(hit.safe_blocks, n)
        raw = min(max(hit.raw_blocks, safe), n)
        l2 = min(max(hit.l2_blocks, safe), n)
        out.append((safe + raw_credit * (raw - safe) + l2_credit * max(0, l2 - max(raw, safe))) / denom)
    return out


class PrefixMatchScorer(Scorer):
    """The seed's prefix_match_fraction: the window-safe fraction of the prompt's full pages cached
    on the worker (L1), plus `seed_raw_credit` x its full-KV-only pages beyond them and the tier's
    credit x the pages its host tier (L2) can restore beyond both (0 credits: window-safe L1 only)."""

    name = "prefix_match"

    @property
    def reads_l2(self) -> bool:  # type: ignore[override]
        return self.config.tier_credit.l2 > 0 and self.config.seed_l2_credit

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        cfg = self.config
        l2 = cfg.tier_credit.l2 if cfg.seed_l2_credit else 0.0
        return _match_fractions(req, cands, cfg.seed_raw_credit, l2, cfg.match_scale_tokens)


class RawPrefixMatchScorer(Scorer):
    """The window-safe fraction plus `raw_match_credit` times the full-KV-only fraction beyond it."""

    name = "prefix_match_raw"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        return _match_fractions(req, cands, self.config.raw_match_credit, 0.0)


class LoadScorer(Scorer):
    """1 - normalized_load (see the module doc); `load_norm` says what the load is measured against:
    "busiest" (the busiest candidate, the prompt and the floor: in [0, 1]) or "prompt" (the prompt
    and the floor only: a backlog of k prompts is k, whatever the other candidates carry)."""

    name = "load"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        loads = [c.load_tokens for c in cands]
        busiest = max(loads, default=0) if self.config.load_norm == "busiest" else 0
        denom = max(busiest, req.prompt_len, self.config.load_floor_tokens, 1)
        return [1.0 - load / denom for load in loads]


TIE_CREDIT = 1e-3  # sticky: weight of full-KV-only pages when choosing the holder (ties only)


class StickyScorer(Scorer):
    """Sticky until saturated: 1 for the candidates holding the longest full-KV prefix of the prompt
    (pending entries included; at least `sticky_min_fraction` of it, so that a shared system prompt
    makes no holder) whose backlog exceeds the least busy candidate's by less than `saturation_s`
    seconds of prefill at their speed, 0 for the others. With a weight above the other scorers' range the holder wins until it is saturated;
    past that the seed's terms decide alone. Chosen on traces (docs/router.md)."""

    name = "sticky"

    @property
    def reads_l2(self) -> bool:  # type: ignore[override]
        return self.config.tier_credit.l2 > 0 and self.config.seed_l2_credit

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        cfg = self.config
        if cfg.saturation_s <= 0:
            return [0.0] * len(cands)
        l2 = cfg.tier_credit.l2 if cfg.seed_l2_credit else 0.0
        # the holder: the longest window-safe match; full KV beyond it (a sibling's pending prefix)
        # only breaks ties, and the holder's full-KV reach must be a real share of the prompt
        match = _match_fractions(req, cands, TIE_CREDIT, l2)
        reach = _match_fractions(req, cands, 1.0, l2)
        best = max(match, default=0.0)
        top = [i for i, m in enumerate(match) if m >= best - 1e-12]
        if best <= 0 or max(reach[i] for i in top) < cfg.sticky_min_fraction:  # a system prompt: no holder
            return [0.0] * len(cands)
        # saturated: its backlog exceeds the least busy candidate's by `saturation_s` of prefill
        # (relative, so that a fleet that is behind as a whole keeps its conversations in place)
        least = min((c.load_tokens for c in cands), default=0)
        out = []
        for c, m in zip(cands, match, strict=True):
            tps = c.tokens_per_s or cfg.prefill_tokens_per_s
            ahead = (c.load_tokens - least) / tps
            out.append(1.0 if m >= best - 1e-12 and ahead < cfg.saturation_s else 0.0)
        return out


class AbsoluteLoadScorer(Scorer):
    """1 - load / max(prompt_len, load_floor_tokens): loads in units of the request's own length.
    Not bounded below by 0 (a backlog of 3 prompts scores -2): differences stay in tokens."""

    name = "load_abs"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        denom = max(req.prompt_len, self.config.load_floor_tokens, 1)
        return [1.0 - c.load_tokens / denom for c in cands]


class CostScorer(Scorer):
    """min_ttft / ttft: the fastest predicted first token scores 1, one twice as slow 0.5."""

    name = "cost"
    reads_l2 = True

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        ttfts = [self.predict_ttft(req, c) for c in cands]
        best = min(ttfts, default=0.0)
        return [best / t if t > 0 else 1.0 for t in ttfts]

    def cached_credit(self, req: RouteRequest, c: Candidate) -> float:
        """Prompt tokens whose prefill the worker skips, weighted by the tier they come from."""
        if not req.index_usable:
            return 0.0
        credit = self.config.tier_credit
        hit = req.hit(c)
        l1 = req.tokens(hit.safe_blocks)
        l2 = req.tokens(hit.l2_blocks)
        l3 = req.tokens(req.l3_blocks)
        cached = credit.l1 * l1 + credit.l2 * max(0, l2 - l1) + credit.l3 * max(0, l3 - max(l1, l2))
        return min(cached, req.prompt_len - 1.0)  # the last prompt token is always computed

    def predict_ttft(self, req: RouteRequest, c: Candidate) -> float:
        tps = c.tokens_per_s or self.config.prefill_tokens_per_s
        work = c.queued_tokens + req.prompt_len - self.cached_credit(req, c)
        return self.config.prefill_overhead_s + work / tps


class CacheRoomScorer(Scorer):
    """1 - the worker's cached pages / the most any candidate caches: new prefixes go where the
    cache is smallest, so that the fleet's caches fill evenly and evict late (what sglang-router's
    cache_aware does with its smallest tree). 0 weight in the presets unless chosen on traces."""

    name = "cache_room"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        pages = [req.cached_pages.get(c.worker_id, 0) for c in cands]
        top = max(pages, default=0)
        return [1.0 - p / top if top else 1.0 for p in pages]


class FreeKVScorer(Scorer):
    """Free KV tokens relative to the candidate with the most (unknown load counts as the most)."""

    name = "free_kv"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        top = max((c.free_kv_tokens for c in cands if c.has_load), default=0)
        if top <= 0:
            return [1.0] * len(cands)
        return [c.free_kv_tokens / top if c.has_load else 1.0 for c in cands]


class RunningScorer(Scorer):
    """1 - requests on the worker (running + waiting) relative to the busiest candidate."""

    name = "running"

    def score(self, req: RouteRequest, cands: Sequence[Candidate]) -> list[float]:
        reqs = [c.running + c.waiting for c in cands]
        top = max(reqs, default=0)
        if top <= 0:
            return [1.0] * len(cands)
        return [1.0 - r / top for r in reqs]
