"""The router's API key flags (docs/security.md) and the gate they build."""

from __future__ import annotations

import argparse
import logging

from services.common.api_keys import FileKeyStore, KeyStore, RedisKeyStore
from services.common.rate_limit import RateLimiter
from services.router.auth import ApiKeyGate
from services.router.key_set import KeySet

log = logging.getLogger("swaserve.router.auth")


def add_api_key_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("API keys (off unless one of these is given)")
    keys = g.add_mutually_exclusive_group()
    keys.add_argument(
        "--api-keys", metavar="FILE", help="require keys from this file (`swaserve keys add --file`)"
    )
    keys.add_argument(
        "--api-keys-redis", metavar="URL", nargs="?", const="",
        help="require keys held in Redis (`swaserve keys add --redis URL`); no URL: --redis-url",
    )  # fmt: skip
    g.add_argument(
        "--rate-limit-redis", metavar="URL",
        help="where per-key rate limits are counted (default: --api-keys-redis's URL, else --redis-url)",
    )  # fmt: skip
    g.add_argument(
        "--api-key-refresh", type=float, default=1.0, metavar="S",
        help="seconds between reloads of the key set: the bound on a revocation reaching this replica",
    )  # fmt: skip


def api_key_gate(args: argparse.Namespace) -> ApiKeyGate | None:
    """The gate the flags ask for (started), or None when keys are off."""
    store: KeyStore
    if args.api_keys:
        store = FileKeyStore(args.api_keys)
        keys_redis = None
    elif args.api_keys_redis is not None:
        keys_redis = args.api_keys_redis or args.redis_url
        if not keys_redis:
            raise SystemExit("--api-keys-redis without a URL needs --redis-url")
        store = RedisKeyStore(keys_redis)
    else:
        return None
    limits_url = args.rate_limit_redis or keys_redis or args.redis_url
    if not limits_url:
        log.warning(
            "API keys: no Redis to count rate limits in (--rate-limit-redis): keys' limits not enforced"
        )
    limiter = RateLimiter(limits_url) if limits_url else None
    return ApiKeyGate(KeySet(store, refresh_s=args.api_key_refresh).start(), limiter)
