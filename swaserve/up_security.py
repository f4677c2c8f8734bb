"""`swaserve up`'s security flags (docs/security.md): API keys on the router, the internal gRPC token
and TLS for every service. Every port but the router's binds 127.0.0.1 (up.py); the router binds
--host (default 127.0.0.1 too: exposing it is a choice, and a warning without --api-keys)."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from services.common.api_keys import FileKeyStore
from services.common.grpc_auth import CA_ENV, CERT_ENV, KEY_ENV, TOKEN_FILE_ENV, InternalSecurity


def add_security_args(u: argparse.ArgumentParser) -> None:
    u.add_argument(
        "--api-keys", metavar="FILE", default="",
        help="require API keys from FILE on the router (make them with `swaserve keys add --file FILE "
        "--name NAME`); per-key limits are counted in up's Redis. Default: no keys (local use)",
    )  # fmt: skip
    u.add_argument(
        "--internal-token-file", metavar="FILE", default="",
        help="every service requires this token on internal gRPC calls, and sends it",
    )  # fmt: skip
    u.add_argument(
        "--tls-cert", metavar="PEM", default="", help="internal gRPC TLS: every service's certificate"
    )
    u.add_argument("--tls-key", metavar="PEM", default="", help="internal gRPC TLS: its key")
    u.add_argument(
        "--tls-ca", metavar="PEM", default="", help="internal gRPC TLS: the CA (clients check servers; mTLS)"
    )


def security_env(args: argparse.Namespace) -> dict[str, str]:
    """What every child gets in its environment (grpc_auth reads it); checked here, once, so that a
    bad file is one clear error from `up` rather than every child crashing."""
    env = {}
    for value, name in ((args.internal_token_file, TOKEN_FILE_ENV), (args.tls_cert, CERT_ENV),
                        (args.tls_key, KEY_ENV), (args.tls_ca, CA_ENV)):  # fmt: skip
        if value:
            env[name] = str(Path(value).resolve())
    InternalSecurity.from_env(env)  # ValueError naming the flag's variable and file
    return env


def router_security_args(args: argparse.Namespace) -> list[str]:
    if not args.api_keys:
        return []
    path = Path(args.api_keys).resolve()
    if not path.is_file():
        raise ValueError(f"--api-keys {args.api_keys}: no such file; make a key: swaserve keys add --file "
                         f"{args.api_keys} --name NAME")  # fmt: skip
    if not any(k.active for k in FileKeyStore(path).load()):  # ValueError for a file that is not a key file
        raise ValueError(
            f"--api-keys {args.api_keys}: no active key in it; swaserve keys add --file {args.api_keys}"
        )
    return ["--api-keys", str(path)]


def exposure_warning(args: argparse.Namespace) -> str | None:
    if args.api_keys or is_loopback(args.host):
        return None
    return (f"warning: the router listens on {args.host} without API keys: anyone who can reach port "
            f"{args.port} can use it (--api-keys FILE)")  # fmt: skip


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
