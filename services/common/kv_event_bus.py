"""KV events from prefill workers to router replicas through Redis (docs/kv-events.md argues the design).

    worker (loop thread)   publish(events) -> pending queue -> I/O thread -> MULTI: sets + meta + XADD
    router (any replica)   KVIndexFollower: snapshot the sets -> XREAD the stream -> PrefixIndex

Redis holds, per source (a worker's tier), the authoritative current state as two sets of block
hashes (full, swa) plus a meta hash with (epoch, seq), and one stream of changes for all sources
(keys and encoding: kv_event_wire.py). Every write of a source is one MULTI/EXEC that changes its
sets, sets meta's seq to the entry's and appends the entry, so the sets after entry n are exactly
the fold of the source's entries up to n. Entry kinds: "ops" (a change, seq + 1), "resync" (the
sets were rewritten whole), "beat" (no change: the current seq, every `heartbeat_s`), "left" (a
clean shutdown). Keys carry a TTL refreshed by every write and beat: a dead worker's state
vanishes by itself.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from services.common.block_hash import BlockHash
from services.common.kv_event_wire import (
    DEFAULT_PREFIX,
    EntryKind,
    IndexOp,
    KVKeys,
    StreamEntry,
    hash_members,
    make_client,
    ops_from_events,
)
from services.common.kv_index_follower import KVIndexFollower

if TYPE_CHECKING:
    from services.common.kv_events import KVEvent

log = logging.getLogger(__name__)

SnapshotFn = Callable[[], tuple[Iterable[BlockHash], Iterable[BlockHash]]]


@dataclass(frozen=True)
class _Resync:
    full: tuple[BlockHash, ...]
    swa: tuple[BlockHash, ...]


@dataclass
class _Batch:
    seq: int
    kind: EntryKind
    ops: list[IndexOp]
    resync: _Resync | None = None


class KVEventPublisher:
    """Publishes one worker's KV events; `publish` runs on the engine loop thread and never blocks on Redis.

    The I/O thread writes pending batches in order. A failed write is retried once Redis answers,
    after reading meta's seq to learn whether it landed. Whenever the published state may differ
    from the worker's (events dropped before `publish`, the pending queue overflowed, Redis lost
    the keys or holds a seq it should not), the next `publish` takes `snapshot_fn()` (on the loop
    thread, so it is consistent with the events drained there) and rewrites the sets whole. The
    first `publish` does that too: it replaces whatever a previous process with this id left.
    """

    def __init__(
        self,
        redis_url: str,
        worker_id: str,
        page_size: int,
        window: int,
        prefix: str = DEFAULT_PREFIX,
        *,
        tier: str = "l1",
        snapshot_fn: SnapshotFn | None = None,
        ttl: float = 15.0,
        heartbeat_s: float = 1.0,
        max_pending: int = 200_000,
        stream_maxlen: int = 100_000,
        client: redis.Redis | None = None,
        epoch: str = "",
    ) -> None:
        if "|" in tier or not tier or not worker_id:
            raise ValueError(f"bad source: tier={tier!r} worker={worker_id!r}")
        self.worker_id, self.tier = worker_id, tier
        self.page_size, self.window = page_size, window
        self.keys = KVKeys(prefix)
        self.full_key, self.swa_key, self.meta_key = self.keys.of(tier, worker_id)
        self.snapshot_fn = snapshot_fn
        self.ttl_ms = int(ttl * 1000)
        self.heartbeat_s = heartbeat_s
        self.max_pending = max_pending
        self.stream_maxlen = stream_maxlen
        self.redis = client or make_client(redis_url)
        self.epoch = epoch or secrets.token_hex(8)  # the worker's start_id (fencing), else random
        # stats (read by metrics / tests)
        self.redis_ok = True
        self.redis_errors = 0
        self.resyncs = 0  # whole-state rewrites written
        self.batches_written = 0
        self.resyncs_requested = 0
        # shared between the loop thread and the I/O thread, under _cond
        self._cond = threading.Condition()
        self._pending: deque[list[IndexOp] | _Resync] = deque()
        self._pending_hashes = 0
        self._resync = True  # the first publish writes the whole state
        self._closed = False
        # I/O thread only
        self._acked = 0  # the seq Redis holds for us, as far as we know
        self._inflight: _Batch | None = None
        self._unsure = False  # a Redis error happened: check meta before writing a delta
        self._last_write = 0.0
        self._thread = threading.Thread(target=self._run, name=f"kv-events-{worker_id}", daemon=True)
        self._thread.start()

    # -- loop thread ---------------------------------------------------------------------------
    def publish(self, events: Sequence[KVEvent], dropped: int = 0) -> None:
        """Hand over the events drained since the last call; `dropped`: events lost before them.
        Never raises: what goes wrong here is logged and repaired by a resync."""
        if self._closed:
            return
        try:
            self._publish(events, dropped)
        except Exception:  # noqa: BLE001 - never into the engine loop
            log.exception("kv events %s: publish failed; resyncing", self.worker_id)
            with self._cond:
                self._want_resync("publish failed")

    def _publish(self, events: Sequence[KVEvent], dropped: int) -> None:
        ops = ops_from_events(events)
        with self._cond:
            if dropped > 0:
                self._want_resync(f"{dropped} events dropped before publishing")
            if not self._resync:
                if ops:
                    self._pending.append(ops)
                    self._pending_hashes += sum(len(o.hashes) + 1 for o in ops)
                    if self._pending_hashes > self.max_pending:
                        self._want_resync(f"more than {self.max_pending} block hashes pending")
                    self._cond.notify()
                return
            if not self.redis_ok:
                return  # snapshot once Redis answers; until then these events are part of it
        full, swa = self.snapshot_fn() if self.snapshot_fn is not None else ((), ())
        with self._cond:
            self._pending.clear()
            self._pending.append(_Resync(tuple(full), tuple(swa)))
            self._pending_hashes = 0
            self._resync = False
            self._cond.notify()

    def publish_buffer(self, buffer: Any) -> None:
        """Drain an engine's EventBuffer (loop thread): its events and the count it dropped since."""
        dropped = buffer.dropped
        buffer.dropped = 0
        self.publish(buffer.drain(), dropped)

    # -- any thread ----------------------------------------------------------------------------
    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything handed over so far is in Redis (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._inflight is not None or self._resync:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Stop, and delete this source's state (a clean shutdown: routers drop the worker at once)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5.0)
        entry = StreamEntry(self.worker_id, self.tier, self.epoch, self._acked + 1, "left")
        try:
            p = self.redis.pipeline(transaction=True)
            p.delete(self.full_key, self.swa_key, self.meta_key)
            p.srem(self.keys.sources, self.keys.source(self.tier, self.worker_id))
            p.xadd(self.keys.stream, entry.to_fields(), maxlen=self.stream_maxlen, approximate=True)  # type: ignore[arg-type]
            p.execute()
        except redis.RedisError as e:
            log.warning(
                "kv events: could not clear %s on close (%s); its keys expire by TTL", self.worker_id, e
            )
        self.redis.close()

    # -- I/O thread ----------------------------------------------------------------------------
    def _want_resync(self, why: str) -> None:  # under _cond
        if not self._resync:
            log.warning("kv events %s: resync (%s)", self.worker_id, why)
            self.resyncs_requested += 1
        self._resync = True
        self._pending.clear()
        self._pending_hashes = 0

    def _take(self) -> _Batch | None:  # under _cond
        if not self._pending:
            return None
        head = self._pending.popleft()
        if isinstance(head, _Resync):
            return _Batch(self._acked + 1, "resync", [], head)
        ops = list(head)
        while self._pending and isinstance(self._pending[0], list) and len(ops) < 1024:
            ops += cast(list[IndexOp], self._pending.popleft())
        self._pending_hashes = max(0, self._pending_hashes - sum(len(o.hashes) + 1 for o in ops))
        return _Batch(self._acked + 1, "ops", ops)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while (
                    not self._closed
                    and self._inflight is None
                    and not self._pending
                    and time.monotonic() - self._last_write < self.heartbeat_s
                ):
                    self._cond.wait(self.heartbeat_s)
                if self._closed:
                    return
                if self._inflight is None:
                    self._inflight = self._take()
            try:
                if self._inflight is not None:
                    self._write_inflight()
                else:
                    self._heartbeat()
            except Exception as e:  # noqa: BLE001 - RedisError, or a bug: keep the thread alive
                self.redis_errors += 1
                if not isinstance(e, redis.RedisError):
                    log.exception("kv events %s: unexpected error", self.worker_id)
                elif self.redis_ok:
                    log.warning("kv events %s: Redis unreachable (%s); retrying", self.worker_id, e)
                self.redis_ok = False
                self._unsure = True
                with self._cond:
                    self._cond.wait(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            if not self.redis_ok:
                log.warning("kv events %s: Redis reachable again", self.worker_id)
            self.redis_ok = True
            backoff = 0.05

    def _write_inflight(self) -> None:
        batch = self._inflight
        assert batch is not None
        if self._unsure and batch.kind == "ops":
            meta: Any = self.redis.hmget(self.meta_key, ["e", "n"])
            epoch, seq = meta
            if epoch is not None and epoch.decode() == self.epoch and int(seq) == batch.seq:
                self._done(batch)  # it landed before the error
                return
            if epoch is None or epoch.decode() != self.epoch or int(seq) != self._acked:
                with self._cond:  # Redis lost our state (restart) or someone else wrote it
                    self._inflight = None
                    self._want_resync("the state in Redis is not the one we wrote")
                    self._cond.notify_all()
                return
        self._unsure = False
        self._write(batch)
        self._done(batch)

    def _done(self, batch: _Batch) -> None:
        with self._cond:
            self._acked = batch.seq
            self._inflight = None
            self._cond.notify_all()
        self._unsure = False
        self.batches_written += 1
        self.resyncs += batch.kind == "resync"

    def _write(self, batch: _Batch) -> None:
        p = self.redis.pipeline(transaction=True)
        if batch.resync is not None:
            p.delete(self.full_key, self.swa_key)
            for key, hashes in ((self.full_key, batch.resync.full), (self.swa_key, batch.resync.swa)):
                for i in range(0, len(hashes), 10_000):
                    p.sadd(key, *hash_members(hashes[i : i + 10_000]))
        for o in batch.ops:
            if o.op == "clear":
                p.delete(self.full_key, self.swa_key)
            elif o.hashes:
                key = self.full_key if o.kind == "full" else self.swa_key
                for i in range(0, len(o.hashes), 10_000):
                    members = hash_members(o.hashes[i : i + 10_000])
                    if o.op == "store":
                        p.sadd(key, *members)
                    else:
                        p.srem(key, *members)
        p.hset(self.meta_key, mapping={"e": self.epoch, "n": batch.seq, "w": self.worker_id, "t": self.tier,
                                       "page_size": self.page_size, "window": self.window,
                                       "updated": time.time()})  # fmt: skip
        self._expire_all(p)
        entry = StreamEntry(self.worker_id, self.tier, self.epoch, batch.seq, batch.kind, tuple(batch.ops))
        p.xadd(self.keys.stream, entry.to_fields(), maxlen=self.stream_maxlen, approximate=True)  # type: ignore[arg-type]
        p.execute()
        self._last_write = time.monotonic()

    def _expire_all(self, p: Any) -> None:
        for key in (self.full_key, self.swa_key, self.meta_key):
            p.pexpire(key, self.ttl_ms)
        p.sadd(self.keys.sources, self.keys.source(self.tier, self.worker_id))

    def _heartbeat(self) -> None:
        """Refresh the TTLs; if Redis no longer holds what we wrote, resync; else append a beat.
        With a resync due anyway, only learn whether Redis answers (publish waits for that)."""
        if self._resync:
            self.redis.ping()
            self._last_write = time.monotonic()
            return
        p = self.redis.pipeline(transaction=True)
        self._expire_all(p)
        p.hmget(self.meta_key, ["e", "n"])
        epoch, seq = p.execute()[-1]
        self._last_write = time.monotonic()
        if epoch is None or epoch.decode() != self.epoch or int(seq) != self._acked:
            with self._cond:  # deltas queued meanwhile would apply to a state Redis no longer has
                self._want_resync("Redis lost our state")
            return
        self._unsure = False
        entry = StreamEntry(self.worker_id, self.tier, self.epoch, self._acked, "beat")
        self.redis.xadd(self.keys.stream, entry.to_fields(), maxlen=self.stream_maxlen, approximate=True)  # type: ignore[arg-type]


__all__ = ["DEFAULT_PREFIX", "KVEventPublisher", "KVIndexFollower", "SnapshotFn"]
