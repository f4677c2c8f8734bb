"""L3, the distributed tier of the KV cache: GCache (services/gcache/client.py) as the engine uses it.

Same two kinds of entries as L2 (kv/host_tier.py), in two key namespaces of one GCache cluster:

    <ns>/full   key: a page's chained block hash         value: that page's full-attention KV
    <ns>/swa    key: the block hash of the page a prefix  value: the SWA pages of the window before
                ends at                                          that end (kv_bytes.py layout)

`ns` names the model's weights, the KV geometry, dtype and page size, so workers share blocks
exactly when their KV would be bit-identical. Never a sequence's whole SWA history.

Both directions run off the engine thread, on this tier's own threads:
- `write(items)`: write-down of what the engine just wrote through to L2 (values already copied
  out of the device); dropped (counted) when more than `max_inflight_bytes` are still on their way,
  so a slow or dead cluster never slows the loop.
- `fetch(hashes, start)`: for a queued request, the longest run of pages from `start` whose full
  blocks AND the tail at its end are in L3; two round trips (one exists query for both kinds, one
  batched get). The engine installs the result into L2 and the request's admission restores it
  from there (engine.py), so admission itself never waits on the network.
A GCache failure is a miss or a dropped write, never an error of the request.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from services.common.block_hash import BlockHash
from services.common.kv_spec import KVLayerSpec
from services.gcache.client import BlockKey

log = logging.getLogger(__name__)


class L3Store(Protocol):
    """What the tier needs of services/gcache/client.GCacheClient."""

    def put_many(self, items: Any) -> Any: ...
    def get_many(self, keys: Any) -> Any: ...
    def exists_each(self, keys: Any) -> list[bool]: ...


@dataclass(frozen=True)
class L3Fetch:
    """Pages [start, end) found in L3: each page's full-attention value and the tail at `end`."""

    start: int
    end: int
    full: tuple[Any, ...]  # bytes-like, one per page
    tail: Any  # bytes-like: the SWA pages of the window before `end`


@dataclass
class L3Counters:
    writes: int = 0  # values handed to GCache
    writes_dropped: int = 0  # values not sent: too much in flight
    write_errors: int = 0  # values GCache refused or could not place
    write_bytes: int = 0
    fetches: int = 0
    fetch_hits: int = 0  # fetches that found at least one restorable page
    fetch_pages: int = 0  # pages found, summed
    fetch_bytes: int = 0
    fetch_errors: int = 0  # a fetch that raised, or a value of the wrong size (a miss)


def namespace(model: str, specs: Sequence[KVLayerSpec], window: int, dtype: str, page_size: int) -> str:
    """The key namespace: readable model name plus a digest of everything the bytes depend on.
    The digested text is fixed (the layers' kind, heads and dims, then the window, dtype and page
    size), so blocks written by an earlier version stay readable; tests/engine pins it."""
    layers = ", ".join(
        f"LayerKVSpec(kind={s.kind!r}, kv_heads={s.kv_heads}, k_dim={s.k_dim}, v_dim={s.v_dim})" for s in specs
    )
    text = f"({model!r}, ([{layers}], {window!r}), {dtype!r}, {page_size!r})"
    digest = hashlib.blake2b(text.encode(), digest_size=8).hexdigest()
    return f"{model}/{digest}"


class L3Tier:
    def __init__(
        self,
        store: L3Store,
        ns: str,
        full_nbytes: int,
        swa_page_nbytes: int,
        tail_pages: Callable[[int], int],
        max_inflight_bytes: int = 256 << 20,
        threads: int = 2,
    ) -> None:
        self.store = store
        self.ns = ns
        self.full_nbytes = full_nbytes
        self.swa_page_nbytes = swa_page_nbytes
        self.tail_pages = tail_pages  # SWA pages of the tail ending at page e (HostTier.tail_pages)
        self.max_inflight_bytes = max_inflight_bytes
        self.counters = L3Counters()
        self._lock = threading.Lock()
        self._inflight = 0
        self._pending: set[Future[None]] = set()
        # separate threads, so that a backlog of writes never delays a queued request's lookup
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="l3-write")
        self._fetcher = ThreadPoolExecutor(threads, thread_name_prefix="l3-fetch")

    def key_full(self, h: int) -> BlockKey:
        return BlockKey.for_block(h, self.ns + "/full")

    def key_tail(self, h: int) -> BlockKey:
        return BlockKey.for_block(h, self.ns + "/swa")

    # -- write-down ------------------------------------------------------------------------------
    def write(self, items: Sequence[tuple[BlockKey, Any]]) -> bool:
        """Send values to GCache in the background; False (and nothing sent) if too much is in flight."""
        if not items:
            return True
        size = sum(_size(v) for _, v in items)
        with self._lock:
            if self._inflight and self._inflight + size > self.max_inflight_bytes:
                self.counters.writes_dropped += len(items)
                return False
            self._inflight += size
        fut = self._writer.submit(self._put, list(items), size)
        with self._lock:
            self._pending.add(fut)
        fut.add_done_callback(self._done)
        return True

    def _put(self, items: list[tuple[BlockKey, Any]], size: int) -> None:
        try:
            report = self.store.put_many(items)
            bad = int(getattr(report, "dropped", 0)) + len(getattr(report, "errors", {}) or {})
            with self._lock:
                self.counters.writes += len(items)
                self.counters.write_errors += bad
                self.counters.write_bytes += size
        except Exception:  # noqa: BLE001 - a write-down never fails anything else
            log.exception("l3: write-down of %d values failed", len(items))
            with self._lock:
                self.counters.write_errors += len(items)
        finally:
            with self._lock:
                self._inflight -= size

    def _done(self, fut: Future[None]) -> None:
        with self._lock:
            self._pending.discard(fut)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for the writes sent so far (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending)
        for f in pending:
            f.result(timeout)

    # -- fetch -----------------------------------------------------------------------------------
    def fetch(
        self, hashes: Sequence[BlockHash], start: int, max_pages: int | None = None
    ) -> Future[L3Fetch | None]:
        """The longest restorable run from page `start` (hashes[i] = page i's block hash), at most
        `max_pages` long, fetched in the background; the result is None for a miss (or any failure)."""
        stop = len(hashes) if max_pages is None else min(len(hashes), start + max_pages)
        return self._fetcher.submit(self._fetch, list(hashes[:stop]), start)

    def _fetch(self, hashes: list[BlockHash], start: int) -> L3Fetch | None:
        with self._lock:
            self.counters.fetches += 1
        try:
            got = self._lookup(hashes, start)
        except Exception:  # noqa: BLE001 - L3 down or broken: a miss
            log.exception("l3: fetch failed")
            got = None
            with self._lock:
                self.counters.fetch_errors += 1
        if got is not None:
            with self._lock:
                self.counters.fetch_hits += 1
                self.counters.fetch_pages += got.end - got.start
                self.counters.fetch_bytes += self.full_nbytes * (got.end - got.start) + _size(got.tail)
        return got

    def _lookup(self, hashes: list[BlockHash], start: int) -> L3Fetch | None:
        rest = hashes[start:]
        if not rest:
            return None
        full_keys = [self.key_full(h) for h in rest]
        tail_keys = [self.key_tail(h) for h in rest]
        present = self.store.exists_each(full_keys + tail_keys)
        full_here, tail_here = present[: len(rest)], present[len(rest) :]
        run = next((i for i, p in enumerate(full_here) if not p), len(rest))
        ends = [i + 1 for i in range(run) if tail_here[i]]  # relative ends with a tail
        while ends:
            n = ends.pop()
            values = self.store.get_many(full_keys[:n] + [tail_keys[n - 1]])
            full = [values.get(k) for k in full_keys[:n]]
            tail = values.get(tail_keys[n - 1])
            good = next((i for i, v in enumerate(full) if v is None or _size(v) != self.full_nbytes), n)
            tail_ok = tail is not None and _size(tail) == self.tail_pages(start + n) * self.swa_page_nbytes
            if good == n and tail_ok:
                return L3Fetch(start, start + n, tuple(full), tail)
            wrong_size = (tail is not None and not tail_ok) or (good < n and full[good] is not None)
            if wrong_size:  # never installed
                with self._lock:
                    self.counters.fetch_errors += 1
            ends = [e for e in ends if e <= good]  # evicted meanwhile: a shorter end, if any
        return None

    # -- state -----------------------------------------------------------------------------------
    def counters_dict(self) -> dict[str, int]:
        with self._lock:
            return asdict(self.counters)

    def close(self, timeout: float = 10.0) -> None:
        try:
            self.flush(timeout)
        finally:
            self._writer.shutdown(wait=False, cancel_futures=True)
            self._fetcher.shutdown(wait=False, cancel_futures=True)


def _size(v: Any) -> int:
    return len(memoryview(v).cast("B"))
