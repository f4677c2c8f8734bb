"""API keys of the HTTP endpoint: made, stored hashed, listed and revoked (docs/security.md).

A key is `sk-swa-` + 32 random bytes (base64url); only its SHA-256 is ever stored. A fast unsalted
hash is enough for a key with 256 bits of entropy: nobody can enumerate the key space, so the
slow, salted hashes made for human passwords (bcrypt, argon2) would only cost the router
milliseconds per request for no gain. The record keeps the key's name, its per-minute limits and,
once revoked, when; a revoked key stays listed.

Two stores, one interface: a JSON file (written atomically, mode 0600, under an flock) or a Redis
hash `swaserve:api_keys` (field: the key's hash, value: the record as JSON), which every router
replica reads.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

KEY_PREFIX = "sk-swa-"
REDIS_HASH = "swaserve:api_keys"
FILE_VERSION = 1


def new_key() -> str:
    return KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    """One key's record. rpm / tpm: requests / tokens per minute (0: unlimited)."""

    name: str
    key_hash: str
    rpm: int = 0
    tpm: int = 0
    created: float = 0.0
    revoked: float | None = None  # when, or None while the key is valid

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a key needs a name")
        if len(self.key_hash) != 64:
            raise ValueError(f"key {self.name!r}: key_hash must be a SHA-256 hex digest")
        if self.rpm < 0 or self.tpm < 0:
            raise ValueError(f"key {self.name!r}: rpm and tpm must be >= 0 (0: unlimited)")

    @property
    def key_id(self) -> str:
        """What `keys list` shows and `keys revoke` accepts besides the name (not a secret)."""
        return self.key_hash[:12]

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any) -> ApiKey:
        if not isinstance(d, dict):
            raise ValueError("a key record must be a JSON object")
        try:
            return cls(
                name=str(d["name"]), key_hash=str(d["key_hash"]), rpm=int(d.get("rpm", 0)),
                tpm=int(d.get("tpm", 0)), created=float(d.get("created", 0.0)),
                revoked=None if d.get("revoked") is None else float(d["revoked"]),
            )  # fmt: skip
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad key record: {e}") from None


class KeyStore(Protocol):
    def load(self) -> list[ApiKey]: ...
    def add(self, name: str, rpm: int = 0, tpm: int = 0) -> tuple[str, ApiKey]: ...
    def revoke(self, ident: str) -> ApiKey: ...


def _new_record(existing: list[ApiKey], name: str, rpm: int, tpm: int) -> tuple[str, ApiKey]:
    if any(k.name == name and k.active for k in existing):
        raise ValueError(f"an active key named {name!r} exists; revoke it first or pick another name")
    key = new_key()
    return key, ApiKey(name, hash_key(key), rpm, tpm, created=time.time())


def _find(keys: list[ApiKey], ident: str) -> ApiKey:
    """The active key named `ident`, or whose id (or full hash) starts with it."""
    hits = [
        k
        for k in keys
        if k.active and (k.name == ident or (len(ident) >= 8 and k.key_hash.startswith(ident)))
    ]
    if not hits:
        raise ValueError(f"no active key named {ident!r} or with that id")
    if len(hits) > 1:
        raise ValueError(f"{ident!r} matches {len(hits)} keys; give the full id")
    return hits[0]


class FileKeyStore:
    """`{"version": 1, "keys": [record, ...]}` in one file; readers see the old or the new file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> list[ApiKey]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{self.path}: not a key file ({e})") from None
        if (
            not isinstance(doc, dict)
            or doc.get("version") != FILE_VERSION
            or not isinstance(doc.get("keys"), list)
        ):
            raise ValueError(f"{self.path}: not a key file (want {{'version': 1, 'keys': [...]}})")
        return [ApiKey.from_json(d) for d in doc["keys"]]

    def add(self, name: str, rpm: int = 0, tpm: int = 0) -> tuple[str, ApiKey]:
        with self._locked():
            keys = self.load()
            key, rec = _new_record(keys, name, rpm, tpm)
            self._write([*keys, rec])
        return key, rec

    def revoke(self, ident: str) -> ApiKey:
        with self._locked():
            keys = self.load()
            old = _find(keys, ident)
            new = replace(old, revoked=time.time())
            self._write([new if k is old else k for k in keys])
        return new

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _write(self, keys: list[ApiKey]) -> None:
        doc = {"version": FILE_VERSION, "keys": [k.to_json() for k in keys]}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RedisKeyStore:
    """The records in one Redis hash; add and revoke are single HSETs (revoke under WATCH)."""

    def __init__(self, url: str, hash_name: str = REDIS_HASH) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self.hash_name = hash_name

    def load(self) -> list[ApiKey]:
        raw = self.client.hgetall(self.hash_name)
        return sorted((ApiKey.from_json(json.loads(v)) for v in raw.values()), key=lambda k: k.created)

    def add(self, name: str, rpm: int = 0, tpm: int = 0) -> tuple[str, ApiKey]:
        key, rec = _new_record(self.load(), name, rpm, tpm)
        self.client.hset(self.hash_name, rec.key_hash, json.dumps(rec.to_json()))
        return key, rec

    def revoke(self, ident: str) -> ApiKey:
        new = replace(_find(self.load(), ident), revoked=time.time())
        self.client.hset(self.hash_name, new.key_hash, json.dumps(new.to_json()))
        return new


def open_store(file: str | None = None, redis_url: str | None = None) -> KeyStore:
    if bool(file) == bool(redis_url):
        raise ValueError("give exactly one of a key file or a Redis URL")
    return FileKeyStore(file) if file else RedisKeyStore(str(redis_url))
