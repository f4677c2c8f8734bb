"""Routing policy configuration: one frozen `PolicyConfig`, built once from a JSON file and/or CLI flags.

    --policy-config FILE   a JSON object with any PolicyConfig field (profiles spelled as below)
    flags                  override the file, field by field (only the flags that were given)

A profile names its plugins (policy/base.py registries) and the scorers' weights:

    {"filters": ["health", "fits", "length_bucket"],
     "scorers": [["prefix_match", 1.0], ["load", 1.0]],
     "picker": "max_score"}

`prefill_policy` picks a preset (PREFILL_PRESETS) unless `prefill_profile` spells one out; the
decode side is `decode_profile` or the default free-KV + running-requests profile.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

_SUFFIX = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_tokens(text: str | int) -> int:
    """`65536`, `64K`, `1M` -> tokens (binary suffixes: 64K = 65536)."""
    if isinstance(text, int):
        return text
    s = text.strip().lower()
    mult = _SUFFIX.get(s[-1:], 1)
    digits = s[:-1] if s[-1:] in _SUFFIX else s
    if not digits.isdigit():
        raise ValueError(f"not a token count: {text!r}")
    return int(digits) * mult


@dataclass(frozen=True)
class LengthBucket:
    """Prefill pool for prompts of up to `max_tokens` (and more than the previous bucket's)."""

    name: str
    max_tokens: int

    def __post_init__(self) -> None:
        if not self.name or self.max_tokens <= 0:
            raise ValueError(f"bad length bucket {self.name!r}: {self.max_tokens}")


DEFAULT_BUCKETS = (
    LengthBucket("short", 64 * 1024),
    LengthBucket("medium", 256 * 1024),
    LengthBucket("long", 1024 * 1024),
)


def parse_buckets(spec: str) -> tuple[LengthBucket, ...]:
    """`short:64K,medium:256K,long:1M` -> buckets, checked increasing."""
    out = []
    for part in spec.split(","):
        name, sep, size = part.strip().partition(":")
        if not sep:
            raise ValueError(f"length bucket {part!r}: expected NAME:MAX_TOKENS")
        out.append(LengthBucket(name.strip(), parse_tokens(size)))
    return _checked_buckets(tuple(out))


def _checked_buckets(buckets: tuple[LengthBucket, ...]) -> tuple[LengthBucket, ...]:
    if not buckets:
        raise ValueError("at least one length bucket is needed")
    sizes = [b.max_tokens for b in buckets]
    if sizes != sorted(set(sizes)) or len({b.name for b in buckets}) != len(buckets):
        raise ValueError("length buckets need distinct names and strictly increasing sizes")
    return buckets


@dataclass(frozen=True)
class TierCredit:
    """How much of a cached token's prefill the cost scorer credits, by where the KV sits.
    1.0 = free (L1, on the worker's device); an L2 (host) or L3 (GCache) hit still costs a copy."""

    l1: float = 1.0
    l2: float = 0.75
    l3: float = 0.25

    def __post_init__(self) -> None:
        if not all(0.0 <= c <= 1.0 for c in (self.l1, self.l2, self.l3)):
            raise ValueError("tier credits must be in [0, 1]")


def parse_tier_credit(spec: str) -> TierCredit:
    """`l1=1,l2=0.75,l3=0.25` (any subset) -> TierCredit."""
    values: dict[str, float] = {}
    for part in spec.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k.strip().lower() not in ("l1", "l2", "l3"):
            raise ValueError(f"tier credit {part!r}: expected l1=F, l2=F or l3=F")
        values[k.strip().lower()] = float(v)
    return TierCredit(**values)


@dataclass(frozen=True)
class ProfileSpec:
    """Plugins by registry name, in pipeline order; scorers with their weights."""

    filters: tuple[str, ...]
    scorers: tuple[tuple[str, float], ...]
    picker: str = "max_score"

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ProfileSpec:
        scorers = tuple((str(s[0]), float(s[1])) for s in raw.get("scorers", ()))
        return cls(
            tuple(str(f) for f in raw.get("filters", ())), scorers, str(raw.get("picker", "max_score"))
        )


PREFILL_FILTERS = ("health", "fits", "length_bucket")
DECODE_FILTERS = ("health", "fits")


@dataclass(frozen=True)
class PolicyConfig:
    prefill_policy: str = "seed"  # a PREFILL_PRESETS name, unless prefill_profile is given
    match_weight: float = 1.0  # seed: score = match_weight * safe_match_fraction - normalized_load
    load_floor_tokens: int = 0  # seed: normalize loads by at least this (and the prompt length)
    affinity_match_weight: float = 2.0  # affinity: weight of the match fraction (seed's match_weight is 1)
    raw_match_credit: float = 0.5  # affinity: credit of full-KV-only blocks beyond the window-safe match
    prefill_tokens_per_s: float = 8192.0  # cost: prefill speed of a worker without a label saying so
    prefill_overhead_s: float = 0.0  # cost: fixed time per prefill
    tier_credit: TierCredit = field(default_factory=TierCredit)
    buckets: tuple[LengthBucket, ...] = DEFAULT_BUCKETS
    decode_free_weight: float = 1.0
    decode_running_weight: float = 1.0
    page_size: int = 16  # must equal the workers' --page-size (the block hash is per page)
    window: int = 128  # SWA window of the model (0: no SWA layers); the index's window-safe match
    prefill_profile: ProfileSpec | None = None
    decode_profile: ProfileSpec | None = None
    # seed: credit of full-KV-only matched blocks (a branch the worker checkpoints)
    seed_raw_credit: float = 0.0
    seed_l2_credit: bool = True  # seed: host-tier (L2) blocks count, at tier_credit.l2
    # seed: normalized_load = load / max(busiest|0, prompt, floor): "busiest" | "prompt"
    load_norm: str = "busiest"
    saturation_s: float = 2.0  # seed: the holder wins while its backlog is below this (0: off)
    sticky_min_fraction: float = 0.5  # seed: a holder sticks only with at least this match fraction
    cache_room_weight: float = 0.0  # seed: weight of the cache_room scorer (even cache footprints)
    sticky_weight: float = 10.0  # seed: weight of the sticky scorer (above the others' range)
    match_scale_tokens: int = 0  # seed: > 0 scores matched tokens / this, not the matched fraction
    pending: bool = True  # routing-time residency: a decision counts as the worker's cache at once
    pending_ttl_base_s: float = 2.0  # a pending entry lives base + factor x its expected prefill time
    pending_ttl_factor: float = 2.0
    pending_ttl_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.page_size <= 0 or self.window < 0:
            raise ValueError("page_size must be > 0 and window >= 0")
        if self.prefill_tokens_per_s <= 0 or self.prefill_overhead_s < 0:
            raise ValueError("prefill_tokens_per_s must be > 0 and prefill_overhead_s >= 0")
        if self.match_weight < 0 or self.load_floor_tokens < 0 or self.affinity_match_weight < 0:
            raise ValueError("match_weight, affinity_match_weight and load_floor_tokens must be >= 0")
        if not 0 < self.pending_ttl_base_s <= self.pending_ttl_max_s or self.pending_ttl_factor < 0:
            raise ValueError("pending TTL: base > 0, factor >= 0, max >= base")
        if self.load_norm not in ("busiest", "prompt"):
            raise ValueError("load_norm must be 'busiest' or 'prompt'")
        if not 0.0 <= self.seed_raw_credit <= 1.0 or self.saturation_s < 0 or self.match_scale_tokens < 0:
            raise ValueError("seed_raw_credit in [0, 1], saturation_s >= 0, match_scale_tokens >= 0")
        if not 0.0 <= self.raw_match_credit <= 1.0:
            raise ValueError("raw_match_credit must be in [0, 1]")
        if self.prefill_profile is None and self.prefill_policy not in PREFILL_PRESETS:
            raise ValueError(f"prefill_policy must be one of {sorted(PREFILL_PRESETS)}")
        _checked_buckets(self.buckets)

    def prefill_spec(self) -> ProfileSpec:
        if self.prefill_profile is not None:
            return self.prefill_profile
        return PREFILL_PRESETS[self.prefill_policy](self)

    def decode_spec(self) -> ProfileSpec:
        if self.decode_profile is not None:
            return self.decode_profile
        scorers = (("free_kv", self.decode_free_weight), ("running", self.decode_running_weight))
        return ProfileSpec(DECODE_FILTERS, scorers)

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PolicyConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown policy config keys: {sorted(unknown)}")
        kw: dict[str, Any] = dict(raw)
        if "tier_credit" in kw and isinstance(kw["tier_credit"], Mapping):
            kw["tier_credit"] = TierCredit(**kw["tier_credit"])
        if "buckets" in kw:
            b = kw["buckets"]
            kw["buckets"] = (
                parse_buckets(b)
                if isinstance(b, str)
                else _checked_buckets(
                    tuple(
                        x if isinstance(x, LengthBucket) else LengthBucket(str(x[0]), parse_tokens(x[1]))
                        for x in b
                    )
                )
            )
        for key in ("prefill_profile", "decode_profile"):
            if isinstance(kw.get(key), Mapping):
                kw[key] = ProfileSpec.from_dict(kw[key])
        return cls(**kw)

    @classmethod
    def from_json_file(cls, path: str | Path) -> PolicyConfig:
        raw = json.loads(Path(path).read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: the policy config must be a JSON object")
        return cls.from_dict(raw)


def _seed(c: PolicyConfig) -> ProfileSpec:
    scorers: tuple[tuple[str, float], ...] = (("prefix_match", c.match_weight), ("load", 1.0))
    if c.saturation_s > 0:
        scorers += (("sticky", c.sticky_weight),)
    if c.cache_room_weight > 0:
        scorers += (("cache_room", c.cache_room_weight),)
    return ProfileSpec(PREFILL_FILTERS, scorers)


def _affinity(c: PolicyConfig) -> ProfileSpec:
    return ProfileSpec(PREFILL_FILTERS, (("prefix_match_raw", c.affinity_match_weight), ("load", 1.0)))


def _cost(c: PolicyConfig) -> ProfileSpec:
    return ProfileSpec(PREFILL_FILTERS, (("cost", 1.0),))


def _load(c: PolicyConfig) -> ProfileSpec:
    return ProfileSpec(PREFILL_FILTERS, (("load", 1.0),))


PREFILL_PRESETS = {"seed": _seed, "affinity": _affinity, "cost": _cost, "load": _load}


# -- command line -------------------------------------------------------------------------------
def add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("routing policy (flags override --policy-config)")
    g.add_argument("--policy-config", help="JSON file with PolicyConfig fields")
    g.add_argument("--prefill-policy", choices=sorted(PREFILL_PRESETS), help="default: seed")
    g.add_argument("--match-weight", type=float, help="seed policy: weight of the window-safe match (1.0)")
    g.add_argument("--load-floor-tokens", type=int, help="seed policy: least load normalizer (0)")
    g.add_argument(
        "--affinity-match-weight", type=float, help="affinity policy: weight of the match fraction (2.0)"
    )
    g.add_argument(
        "--raw-match-credit", type=float, help="affinity policy: credit of full-KV-only matched blocks (0.5)"
    )
    g.add_argument("--prefill-tokens-per-s", type=float, help="cost policy: prefill speed model (8192)")
    g.add_argument("--tier-credit", type=parse_tier_credit, help="cost policy: l1=1,l2=0.75,l3=0.25")
    g.add_argument(
        "--length-buckets",
        type=parse_buckets,
        help="prefill pools by prompt length: short:64K,medium:256K,long:1M",
    )
    g.add_argument("--seed-raw-credit", type=float, help="seed: credit of full-KV-only matched blocks")
    g.add_argument(
        "--seed-l2-credit", action=argparse.BooleanOptionalAction, default=None,
        help="seed: blocks the worker's host tier (L2) can restore count, at the tier credit",
    )  # fmt: skip
    g.add_argument(
        "--load-norm", choices=["busiest", "prompt"], help="seed: what the load is measured against"
    )
    g.add_argument(
        "--saturation-s", type=float, help="seed: the holder wins below this backlog, seconds (0: off)"
    )
    g.add_argument("--cache-room-weight", type=float, help="seed: weight of even cache footprints (0)")
    g.add_argument("--sticky-min-fraction", type=float, help="seed: least match fraction that sticks (0.5)")
    g.add_argument(
        "--match-scale-tokens", type=parse_tokens, help="seed: score matched tokens / this (0: fraction)"
    )
    g.add_argument(
        "--pending", action=argparse.BooleanOptionalAction, default=None,
        help="routing-time residency: a routed prompt counts as its worker's cache until events replace it (on)",
    )  # fmt: skip
    g.add_argument("--pending-ttl-max", type=float, help="seconds a pending entry lives at most (60)")
    g.add_argument("--page-size", type=int, help="KV page size of the workers (16)")
    g.add_argument("--kv-window", type=int, help="SWA window (default: the model's config, 0 if none)")


_FLAG_FIELDS = {
    "prefill_policy": "prefill_policy",
    "match_weight": "match_weight",
    "load_floor_tokens": "load_floor_tokens",
    "affinity_match_weight": "affinity_match_weight",
    "raw_match_credit": "raw_match_credit",
    "prefill_tokens_per_s": "prefill_tokens_per_s",
    "tier_credit": "tier_credit",
    "length_buckets": "buckets",
    "page_size": "page_size",
    "kv_window": "window",
    "pending": "pending",
    "seed_raw_credit": "seed_raw_credit",
    "seed_l2_credit": "seed_l2_credit",
    "load_norm": "load_norm",
    "saturation_s": "saturation_s",
    "sticky_min_fraction": "sticky_min_fraction",
    "cache_room_weight": "cache_room_weight",
    "match_scale_tokens": "match_scale_tokens",
    "pending_ttl_max": "pending_ttl_max_s",
}


def policy_config_from_args(args: argparse.Namespace, default_window: int | None = None) -> PolicyConfig:
    """The JSON file (if any), then every flag that was given; `default_window` (the model's) fills
    the window when neither says it."""
    raw: dict[str, Any] = {}
    if args.policy_config:
        loaded = json.loads(Path(args.policy_config).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.policy_config}: the policy config must be a JSON object")
        raw.update(loaded)
    for flag, name in _FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            raw[name] = value
    if getattr(args, "prefill_policy", None) is not None:
        raw.pop("prefill_profile", None)  # an explicit --prefill-policy beats the file's profile
    if "window" not in raw and default_window is not None:
        raw["window"] = default_window
    return PolicyConfig.from_dict(raw)
