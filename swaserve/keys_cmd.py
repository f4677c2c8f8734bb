"""`swaserve keys add|list|revoke`: the HTTP API's keys, in a file or in Redis (docs/security.md).

`add` prints the record, then the new key alone on the last line (the only time it is shown:
only its SHA-256 is stored), so `swaserve keys add ... | tail -1` is the key.
"""

from __future__ import annotations

import argparse
import time

from services.common.api_keys import ApiKey, KeyStore, open_store


def add_keys_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keys", help="manage the API keys of the HTTP endpoint (a file or Redis)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    add = ksub.add_parser("add", help="make a key; prints it last (shown once)")
    list_ = ksub.add_parser("list", help="list the keys (names, ids, limits; never the keys)")
    revoke = ksub.add_parser("revoke", help="revoke a key by name or id")
    for p in (add, list_, revoke):
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--file", help="the key file (what `swaserve up --api-keys` / the router read)")
        where.add_argument(
            "--redis", metavar="URL", help="the Redis holding the keys (router --api-keys-redis)"
        )
    add.add_argument("--name", required=True, help="who or what the key is for (unique among active keys)")
    add.add_argument("--rpm", type=int, default=0, help="requests per minute (0: unlimited)")
    add.add_argument(
        "--tpm", type=int, default=0, help="tokens per minute, prompt + max_tokens (0: unlimited)"
    )
    revoke.add_argument("ident", metavar="NAME_OR_ID")
    add.set_defaults(func=_cmd_add)
    list_.set_defaults(func=_cmd_list)
    revoke.set_defaults(func=_cmd_revoke)


def _store(args: argparse.Namespace) -> KeyStore:
    return open_store(file=args.file, redis_url=args.redis)


def _cmd_add(args: argparse.Namespace) -> int:
    key, rec = _store(args).add(args.name, rpm=args.rpm, tpm=args.tpm)
    print(
        f"added {rec.name} (id {rec.key_id}, rpm {_limit(rec.rpm)}, tpm {_limit(rec.tpm)}); the key, shown once:"
    )
    print(key)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    keys = _store(args).load()
    print(f"{'NAME':<24} {'ID':<12} {'RPM':>9} {'TPM':>11}  {'CREATED':<20} STATUS")
    for k in keys:
        print(
            f"{k.name:<24} {k.key_id:<12} {_limit(k.rpm):>9} {_limit(k.tpm):>11}  {_when(k.created):<20} {_status(k)}"
        )
    return 0


def _cmd_revoke(args: argparse.Namespace) -> int:
    rec = _store(args).revoke(args.ident)
    print(f"revoked {rec.name} (id {rec.key_id})")
    return 0


def _limit(n: int) -> str:
    return str(n) if n else "unlimited"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def _status(k: ApiKey) -> str:
    return "active" if k.active else f"revoked {_when(k.revoked or 0.0)}"
