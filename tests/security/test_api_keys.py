"""Key stores (services/common/api_keys.py) and `swaserve keys add|list|revoke` on real files and a real Redis."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest

from services.common.api_keys import KEY_PREFIX, FileKeyStore, RedisKeyStore, hash_key, new_key
from services.common.redis_server import RedisServer
from tests.security.conftest import add_key, swaserve


def test_keys_are_random_and_stored_only_as_their_sha256(tmp_path: Path) -> None:
    keys = {new_key() for _ in range(200)}
    assert len(keys) == 200
    for k in keys:
        assert k.startswith(KEY_PREFIX) and len(k) == len(KEY_PREFIX) + 43  # 32 bytes, base64url
        assert hash_key(k) == hashlib.sha256(k.encode()).hexdigest()
    store = FileKeyStore(tmp_path / "keys.json")
    key, rec = store.add("alice", rpm=5, tpm=100)
    text = (tmp_path / "keys.json").read_text()
    assert key not in text and key[len(KEY_PREFIX) :] not in text
    assert rec.key_hash in text
    assert stat.S_IMODE((tmp_path / "keys.json").stat().st_mode) == 0o600
    assert store.load() == [rec]


def test_file_store_add_revoke_and_clear_errors(tmp_path: Path) -> None:
    store = FileKeyStore(tmp_path / "keys.json")
    assert store.load() == []  # no file yet: no keys
    _, a = store.add("a")
    _, b = store.add("b", rpm=3)
    with pytest.raises(ValueError, match="active key named 'a'"):
        store.add("a")
    revoked = store.revoke(b.key_id)  # by id
    assert not revoked.active and revoked.name == "b"
    with pytest.raises(ValueError, match="no active key"):
        store.revoke("b")
    _, b2 = store.add("b")  # a revoked name may be reused
    assert [k.name for k in store.load()] == ["a", "b", "b"]
    assert [k.active for k in store.load()] == [True, False, True]
    with pytest.raises(ValueError, match="no active key"):
        store.revoke("abc")  # too short to be an id, and no such name
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a key file"):
        FileKeyStore(tmp_path / "bad.json").load()
    (tmp_path / "bad2.json").write_text(json.dumps({"version": 1, "keys": [{"name": "x", "key_hash": "ab"}]}))
    with pytest.raises(ValueError, match="SHA-256"):
        FileKeyStore(tmp_path / "bad2.json").load()
    assert a.active and b2.active


def test_redis_store(redis_server: RedisServer) -> None:
    store = RedisKeyStore(redis_server.url)
    key, rec = store.add("svc", tpm=1000)
    assert store.load() == [rec]
    raw = store.client.hgetall("swaserve:api_keys")
    assert list(raw) == [rec.key_hash.encode()] and key.encode() not in b"".join(raw.values())
    store.revoke("svc")
    assert [k.active for k in store.load()] == [False]


def test_cli_add_prints_the_key_last_list_never_shows_it(tmp_path: Path) -> None:
    f = str(tmp_path / "keys.json")
    key = add_key("--file", f, name="team-a", rpm=60, tpm=5000)
    assert key.startswith(KEY_PREFIX)
    (rec,) = FileKeyStore(f).load()
    assert rec.key_hash == hash_key(key) and (rec.rpm, rec.tpm) == (60, 5000)
    listed = swaserve("keys", "list", "--file", f)
    assert listed.returncode == 0 and key not in listed.stdout
    assert "team-a" in listed.stdout and rec.key_id in listed.stdout and "active" in listed.stdout
    out = swaserve("keys", "revoke", "--file", f, "team-a")
    assert out.returncode == 0, out.stderr
    assert "revoked" in swaserve("keys", "list", "--file", f).stdout
    again = swaserve("keys", "revoke", "--file", f, "team-a")
    assert again.returncode == 2 and "no active key named 'team-a'" in again.stderr
    neither = swaserve("keys", "list")
    assert neither.returncode != 0 and "--file" in neither.stderr


def test_cli_on_redis(redis_server: RedisServer) -> None:
    key = add_key("--redis", redis_server.url, name="r1", rpm=2)
    (rec,) = RedisKeyStore(redis_server.url).load()
    assert rec.key_hash == hash_key(key) and rec.rpm == 2
    assert swaserve("keys", "revoke", "--redis", redis_server.url, rec.key_id).returncode == 0
    assert not RedisKeyStore(redis_server.url).load()[0].active
