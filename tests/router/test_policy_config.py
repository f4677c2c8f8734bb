"""The routing policy from the router's command line: flags, a JSON file, the model's window, the index flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.models.model_store import resolve_model
from services.router.main import index_follower, model_window, parse_args
from services.router.policy.config import LengthBucket, ProfileSpec, TierCredit, policy_config_from_args

BASE = ["--port", "1", "--model", "m", "--prefill", "a:1", "--decode", "b:1"]


def test_defaults_and_the_models_window() -> None:
    cfg = policy_config_from_args(parse_args(BASE), default_window=0)
    assert (cfg.prefill_policy, cfg.page_size, cfg.window, cfg.match_weight) == ("seed", 16, 0, 1.0)
    assert [b.max_tokens for b in cfg.buckets] == [65536, 262144, 1048576]
    assert model_window(resolve_model("mimo-tiny")) == 128
    assert model_window(resolve_model("smollm2")) == 0  # no SWA layers: window-safe == raw


def test_flags(tmp_path: Path) -> None:
    args = parse_args(
        BASE
        + ["--prefill-policy", "cost", "--match-weight", "2.5", "--length-buckets", "s:1K,l:8K",
           "--tier-credit", "l2=0.5,l3=0.1", "--prefill-tokens-per-s", "500", "--page-size", "64",
           "--kv-window", "128", "--load-floor-tokens", "4096"]
    )  # fmt: skip
    cfg = policy_config_from_args(args, default_window=0)
    assert cfg.prefill_policy == "cost" and cfg.prefill_spec() == ProfileSpec(
        ("health", "fits", "length_bucket"), (("cost", 1.0),)
    )
    assert cfg.match_weight == 2.5 and cfg.load_floor_tokens == 4096 and cfg.prefill_tokens_per_s == 500
    assert cfg.buckets == (LengthBucket("s", 1024), LengthBucket("l", 8192))
    assert cfg.tier_credit == TierCredit(1.0, 0.5, 0.1)
    assert (cfg.page_size, cfg.window) == (64, 128)  # the flag beats the model's window


def test_json_file_then_flags(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"match_weight": 4.0, "page_size": 32, "window": 64,
                                "prefill_profile": {"filters": ["health"], "scorers": [["load", 1.0]]}}))  # fmt: skip
    cfg = policy_config_from_args(parse_args(BASE + ["--policy-config", str(path)]), default_window=0)
    assert (cfg.match_weight, cfg.page_size, cfg.window) == (4.0, 32, 64)  # the file's window stays
    assert cfg.prefill_spec().scorers == (("load", 1.0),)
    over = parse_args(
        BASE + ["--policy-config", str(path), "--match-weight", "1.5", "--prefill-policy", "seed"]
    )
    cfg = policy_config_from_args(over, default_window=0)
    assert cfg.match_weight == 1.5
    assert cfg.prefill_spec().scorers == (("prefix_match", 1.5), ("load", 1.0), ("sticky", 10.0))
    no_window = tmp_path / "q.json"
    no_window.write_text("{}")
    assert policy_config_from_args(parse_args(BASE + ["--policy-config", str(no_window)]), 128).window == 128


@pytest.mark.parametrize(
    "extra",
    [["--length-buckets", "s:64,l:32"], ["--tier-credit", "l9=1"], ["--prefill-policy", "magic"],
     ["--prefix-index", "on"]],  # "on" needs --redis-url
)  # fmt: skip
def test_bad_policy_flags(extra: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(BASE + extra)


def test_index_follower_off_without_redis_or_when_asked() -> None:
    cfg = policy_config_from_args(parse_args(BASE), default_window=0)
    assert index_follower(parse_args(BASE), cfg) is None
    redis_off = ["--port", "1", "--model", "m", "--redis-url", "redis://127.0.0.1:1", "--prefix-index", "off"]
    assert index_follower(parse_args(redis_off), cfg) is None
