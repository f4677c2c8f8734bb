"""The router side of the KV-event bus: a PrefixIndex rebuilt from Redis and kept current by the stream.

See docs/kv-events.md for the design and the consistency argument; kv_event_wire.py for the keys.

Besides the workers' events the follower reads the routers' pending entries (routing-time
residency: pending_wire.py) from their own stream, in the same XREAD, and applies them to the
index; a (re)load rebuilds them from that stream's last `max TTL` of entries.

Fencing: `fence(worker_id, start_id)` tells the follower a worker's current incarnation (its
registry record's start_id, which is also its publisher's epoch). State of any other epoch is
dropped at once and never loaded again: entries of an earlier process arriving late, its keys
still in Redis, pending entries routed to it. A restarted worker is credited with nothing until
its new process publishes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from services.common.kv_event_wire import (
    DEFAULT_PREFIX,
    IndexOp,
    KVKeys,
    StreamEntry,
    id_tuple,
    make_client,
    member_hashes,
)
from services.common.pending_wire import PendingMessage
from services.common.prefix_index import PrefixIndex

log = logging.getLogger(__name__)

_PRUNE = """if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('SREM', KEYS[2], ARGV[1]) end
return 0"""


class KVIndexFollower:
    """A router replica's PrefixIndex of one tier, rebuilt from Redis and kept current by the stream.

    `start()` loads the sets (noting the stream's last id first), then a thread XREADs from that
    id on. Redis errors keep the last index (counted in `redis_errors`); when Redis answers again
    the follower reloads everything, so it converges on Redis's state whatever happened meanwhile.
    """

    def __init__(
        self,
        redis_url: str,
        page_size: int,
        window: int,
        prefix: str = DEFAULT_PREFIX,
        *,
        tier: str = "l1",
        block_ms: int = 500,
        sweep_s: float = 2.0,
        client: redis.Redis | None = None,
        pending_max_ttl_s: float = 60.0,
    ) -> None:
        self.page_size, self.window, self.tier = page_size, window, tier
        self.keys = KVKeys(prefix)
        self.pending_max_ttl_ms = int(pending_max_ttl_s * 1000)
        self.follows_pending = tier == "l1"  # routing-time residency is device (L1) residency
        self.block_ms = block_ms
        self.sweep_s = sweep_s
        self.redis = client or make_client(redis_url, socket_timeout=block_ms / 1000 + 2.0)
        self._prune = self.redis.register_script(_PRUNE)
        self.index = PrefixIndex(page_size, window)
        self.ready = False
        self.redis_ok = False
        self.redis_errors = 0
        self.events_applied = 0  # index ops applied from the stream
        self.reloads = 0  # per-source reloads (gaps, resyncs, new sources)
        self.full_loads = 0
        self._known: dict[str, tuple[str, int]] = {}  # worker -> (epoch, seq) the index holds
        self._last_id = "0-0"
        self._last_pending_id = "0-0"
        self._fence: dict[str, str] = {}  # worker -> its current incarnation (registry start_id)
        self.fenced = 0  # workers whose state of an earlier incarnation was dropped
        self.pending_applied = 0
        self._lag = 0.0
        self._down_since = 0.0
        self._lock = threading.Lock()  # _known and the index's per-worker state vs forget_worker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()

    # -- public --------------------------------------------------------------------------------
    def start(self, wait: float = 5.0) -> KVIndexFollower:
        """Start following; waits up to `wait` s for the initial load (`ready` says if it finished)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="kv-index-follower", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self.ready and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    @property
    def lag_seconds(self) -> float:
        """How far behind the stream the index is: since Redis went away, or the age of the last entry
        applied when the last read was not caught up (0 when caught up)."""
        if not self.redis_ok:
            return time.time() - self._down_since if self._down_since else 0.0
        return self._lag

    def forget_worker(self, worker_id: str) -> None:
        """The worker left the registry: drop its blocks. If it publishes again, it is reloaded."""
        with self._lock:
            self.index.remove_worker(worker_id)
            self._known.pop(worker_id, None)
            self._fence.pop(worker_id, None)

    def fence(self, worker_id: str, incarnation: str) -> bool:
        """The worker's current incarnation is `incarnation` (its registry record's start_id): drop
        whatever the index holds of another one. True if something was dropped. Cheap when
        nothing changed (called for every record the router sees)."""
        if not incarnation or self._fence.get(worker_id) == incarnation:
            return False
        with self._lock:
            self._fence[worker_id] = incarnation
            known = self._known.get(worker_id)
            stale = known is not None and known[0] != incarnation
            stale_pending = any(
                e.incarnation and e.incarnation != incarnation for e in self.index.pending_of(worker_id)
            )
            if not stale and not stale_pending:
                return False
            self.index.remove_worker(worker_id)
            self._known.pop(worker_id, None)
            self.fenced += 1
        log.info("kv index: %s restarted (start id %s); its earlier state is dropped", worker_id, incarnation)
        return True

    def _fenced_out(self, worker_id: str, epoch: str) -> bool:
        """Whether `epoch` is of an incarnation other than the worker's current one (lock held)."""
        current = self._fence.get(worker_id)
        return current is not None and epoch != current

    def sync(self, timeout: float = 5.0) -> bool:
        """Wait until the index has applied every entry in the stream now (False on timeout/error)."""
        try:
            last: Any = self.redis.xrevrange(self.keys.stream, count=1)
        except redis.RedisError:
            return False
        target = id_tuple(last[0][0]) if last else (0, 0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready and self.redis_ok and id_tuple(self._last_id) >= target:
                return True
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.block_ms / 1000 + 3.0)
        self.redis.close()

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.05
        need_load = True
        next_sweep = time.monotonic() + self.sweep_s
        while not self._stop.is_set():
            try:
                if need_load:
                    self._load()
                    need_load = False
                    self.ready = True
                self._mark_ok()
                self._follow()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + self.sweep_s
                backoff = 0.05
            except redis.RedisError as e:
                self.redis_errors += 1
                if self.redis_ok or not self._down_since:
                    log.warning("kv index: Redis unreachable (%s); keeping the last index", e)
                    self._down_since = time.time()
                self.redis_ok = False
                need_load = True
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)
            except Exception:  # noqa: BLE001 - a malformed state or a bug: log, reload, keep following
                log.exception("kv index: unexpected error; reloading")
                need_load = True
                self._stop.wait(backoff)
                backoff = min(2.0, backoff * 2)

    def _mark_ok(self) -> None:
        if not self.redis_ok and self._down_since:
            log.warning("kv index: Redis reachable again; index reloaded")
        self.redis_ok = True
        self._down_since = 0.0

    def _follow(self) -> None:
        streams = {self.keys.stream: self._last_id}
        if self.follows_pending:
            streams[self.keys.pending] = self._last_pending_id
        res: Any = self.redis.xread(streams, count=512, block=self.block_ms)  # type: ignore[arg-type]
        if not res:
            self._lag = 0.0
            return
        entries: list[Any] = []
        for key, got in res:
            if key.decode() == self.keys.pending:
                self._apply_pending(got)
            else:
                entries = got
        if not entries:
            self._lag = 0.0
            return
        tier = self.tier.encode()
        for entry_id, fields in entries:
            if (
                fields.get(b"t") != tier
            ):  # another tier's entry: not decoded (its ops can be thousands of hashes)
                self._last_id = entry_id.decode()
                continue
            try:
                entry = StreamEntry.from_fields(fields)
            except (KeyError, ValueError) as e:
                log.warning("kv index: skipping malformed entry %s: %s", entry_id, e)
            else:
                if entry.tier == self.tier:
                    self._handle(entry)
            self._last_id = entry_id.decode()
        caught_up = len(entries) < 512
        self._lag = 0.0 if caught_up else max(0.0, time.time() - id_tuple(self._last_id)[0] / 1000)

    def _apply_pending(self, entries: list[Any]) -> None:
        for entry_id, fields in entries:
            self._last_pending_id = entry_id.decode()
            try:
                kind, pid = PendingMessage.peek(fields)
                if kind == "pend" and pid in self.index.pending:
                    continue  # here already (this replica's own decision): add_pending would refuse it
                msg = PendingMessage.from_fields(fields)
            except (KeyError, ValueError) as e:
                log.warning("kv index: skipping malformed pending entry %s: %s", entry_id, e)
                continue
            if msg.kind == "unpend":
                self.index.drop_pending(msg.pid)
                continue
            with self._lock:
                if msg.incarnation and self._fenced_out(msg.worker, msg.incarnation):
                    continue  # routed to a process that is gone
                if self.index.add_pending(msg.entry(id_tuple(entry_id)[0])):
                    self.pending_applied += 1

    def _load_pending(self) -> None:
        """Rebuild the pending entries from the stream's last `pending_max_ttl` (a (re)load)."""
        if not self.follows_pending:
            return
        now_ms = _redis_ms(self.redis.time())
        got: Any = self.redis.xrange(self.keys.pending, min=str(max(0, now_ms - self.pending_max_ttl_ms)))
        self.index.clear_pending()
        self._last_pending_id = got[-1][0].decode() if got else f"{max(0, now_ms - 1)}-0"
        self._apply_pending(got)

    def _handle(self, e: StreamEntry) -> None:
        w = e.worker
        with self._lock:
            if self._fenced_out(w, e.epoch):
                return  # an earlier process of this worker, writing late: never credited again
            known = self._known.get(w)
            if e.kind == "left":
                self.index.remove_worker(w)
                self._known.pop(w, None)
                return
            if e.kind != "resync" and known is not None and known[0] == e.epoch:
                if e.seq <= known[1]:
                    return  # already in the index (it came with a snapshot)
                if e.seq == known[1] + 1 and e.kind == "ops":
                    self._apply(w, e.ops)
                    self._known[w] = (e.epoch, e.seq)
                    return
        self._reload(w)  # a resync, a gap (trimmed entries, a lost write), a new epoch or source

    def _apply(self, w: str, ops: Sequence[IndexOp]) -> None:
        for o in ops:
            if o.op == "clear":
                self.index.clear(w)
            elif o.op == "store":
                self.index.store(w, o.kind, o.hashes)
            else:
                self.index.remove(w, o.kind, o.hashes)
        self.events_applied += len(ops)

    def _reload(self, w: str) -> None:
        full_key, swa_key, meta_key = self.keys.of(self.tier, w)
        p = self.redis.pipeline(transaction=True)
        p.hgetall(meta_key)
        p.smembers(full_key)
        p.smembers(swa_key)
        meta, full, swa = p.execute()
        with self._lock:
            self._install(w, meta, full, swa)
        self.reloads += 1

    def _install(self, w: str, meta: dict[bytes, bytes], full: set[bytes], swa: set[bytes]) -> None:
        """Make the index hold the snapshot of source w (lock held)."""
        if not meta or self._fenced_out(w, meta[b"e"].decode()):
            self.index.remove_worker(w)
            self._known.pop(w, None)
            return
        shape = (int(meta.get(b"page_size", 0)), int(meta.get(b"window", -1)))
        if shape != (self.page_size, self.window):
            if w not in self._warned:
                log.warning("kv index: ignoring %s: page_size/window %s, the router uses %s", w, shape,
                            (self.page_size, self.window))  # fmt: skip
                self._warned.add(w)
            self.index.remove_worker(w)
            self._known.pop(w, None)
            return
        self.index.load_worker(w, member_hashes(full), member_hashes(swa))
        self._known[w] = (meta[b"e"].decode(), int(meta[b"n"]))

    def _load(self) -> None:
        """Every source of our tier, atomically, after noting the stream's last id (docs/kv-events.md)."""
        last: Any = self.redis.xrevrange(self.keys.stream, count=1)
        last_id = last[0][0].decode() if last else "0-0"
        sources: Any = self.redis.smembers(self.keys.sources)
        workers = sorted(w for t, _, w in (m.decode().partition("|") for m in sources) if t == self.tier)
        p = self.redis.pipeline(transaction=True)
        for w in workers:
            full_key, swa_key, meta_key = self.keys.of(self.tier, w)
            p.hgetall(meta_key)
            p.smembers(full_key)
            p.smembers(swa_key)
        res = p.execute()
        with self._lock:
            for i, w in enumerate(workers):
                self._install(w, *res[3 * i : 3 * i + 3])
            for w in self.index.workers() - set(workers):
                self.index.remove_worker(w)
                self._known.pop(w, None)
        self._last_id = last_id
        self._load_pending()
        self.full_loads += 1
        for w in workers:
            if w not in self._known:
                self._prune_source(w)

    def _sweep(self) -> None:
        """Drop sources whose keys expired (a worker that died without saying so)."""
        workers = sorted(self.index.workers())
        if not workers:
            return
        p = self.redis.pipeline(transaction=False)
        for w in workers:
            p.exists(self.keys.of(self.tier, w)[2])
        gone = [w for w, n in zip(workers, p.execute(), strict=True) if not n]
        for w in gone:
            self._prune_source(w)
            self.forget_worker(w)

    def _prune_source(self, w: str) -> None:
        """Take w out of the sources set if (checked atomically) its meta is gone."""
        meta_key = self.keys.of(self.tier, w)[2]
        self._prune(keys=[meta_key, self.keys.sources], args=[self.keys.source(self.tier, w)])


def _redis_ms(t: Any) -> int:
    """Redis TIME (seconds, microseconds) in milliseconds."""
    sec, usec = t
    return int(sec) * 1000 + int(usec) // 1000


__all__ = ["KVIndexFollower"]
