"""The API keys a router accepts: its own copy of the key store, reloaded every `refresh_s`.

Every request is checked against this copy (a dict read, no I/O), so a revocation or a new key
reaches every replica within `refresh_s` plus one load. When the store cannot be read (Redis down,
a half-written file cannot happen: writers rename), the last loaded set stays in force, the error
is logged and counted, and `swaserve_router_api_keys_age_seconds` keeps growing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from services.common.api_keys import ApiKey, FileKeyStore, KeyStore, hash_key

log = logging.getLogger("swaserve.router.keys")


class KeySet:
    def __init__(self, store: KeyStore, refresh_s: float = 1.0) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be > 0")
        self.store = store
        self.refresh_s = refresh_s
        self._by_hash: dict[str, ApiKey] = {}
        self._loaded_at: float | None = None
        self._file_stamp: tuple[int, int, int] | None = None
        self.errors = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def lookup(self, key: str) -> ApiKey | None:
        """The record of `key` (revoked ones too: the caller says why it refuses), or None."""
        return self._by_hash.get(hash_key(key))

    def __len__(self) -> int:
        return sum(1 for k in self._by_hash.values() if k.active)

    def refresh(self) -> bool:
        """Reload from the store (a file only when it changed); False (and the old set kept) on error."""
        try:
            stamp = self._stamp()
            if stamp is not None and stamp == self._file_stamp:
                self._loaded_at = time.monotonic()
                return True
            keys = self.store.load()
        except Exception as e:  # noqa: BLE001 - any store failure keeps the last set
            self.errors += 1
            log.warning("API keys: could not reload from the store (%s); the last loaded set stays", e)
            return False
        self._by_hash = {k.key_hash: k for k in keys}  # one reference swap: readers see old or new
        self._file_stamp = stamp
        self._loaded_at = time.monotonic()
        return True

    def _stamp(self) -> tuple[int, int, int] | None:
        if not isinstance(self.store, FileKeyStore):
            return None
        try:
            st = os.stat(self.store.path)
        except FileNotFoundError:
            return (0, 0, 0)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def start(self) -> KeySet:
        if not self.refresh():
            log.error("API keys: the store could not be read at start; every request is refused until it can")
        self._thread = threading.Thread(target=self._run, name="api-key-refresh", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def age_s(self) -> float:
        return float("inf") if self._loaded_at is None else time.monotonic() - self._loaded_at


class KeySetCollector:
    """`swaserve_router_api_keys` (active keys loaded), `..._age_seconds` (since the last good
    load), `..._refresh_errors_total`."""

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    def collect(self) -> Iterator[Any]:
        yield GaugeMetricFamily("swaserve_router_api_keys", "active API keys loaded", value=len(self.keys))
        age = self.keys.age_s
        yield GaugeMetricFamily(
            "swaserve_router_api_keys_age_seconds", "seconds since the key set was last loaded",
            value=age if age != float("inf") else -1.0,
        )  # fmt: skip
        yield CounterMetricFamily(
            "swaserve_router_api_keys_refresh_errors",
            "failed reloads of the key store",
            value=self.keys.errors,
        )
