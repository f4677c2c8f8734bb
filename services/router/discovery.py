"""Workers discovered in the Redis registry (services/common/registry.py), as a `WorkerPool`.

Picking a worker never waits on Redis: a background thread refreshes a snapshot of the live
records every `refresh_s`, and a subscriber to the registry's load channel replaces a worker's
record as soon as the worker publishes a newer one (on load changes, see services/common/registry.py),
so the loads the router scores are milliseconds old, not a heartbeat old. When Redis is unreachable the router keeps routing with the last
snapshot it had (logged once, counted in `redis_errors`), and picks up fresh records as soon as
Redis answers again. A worker whose heartbeat expires disappears at the next refresh, so within
one registry TTL plus `refresh_s`.

A record missing from Redis is kept until its own deadline (`updated_at + ttl`, the TTL it was
written with) unless the worker announced it left: a Redis restart loses every key, and the
workers write them back at their next heartbeat (services/common/registry.py), so routing never
sees an empty cluster in between. A worker that crashed is gone at the same time its key would have been.

`mark_down(addr)` hides a worker the router could not reach until its record shows a heartbeat
written after the mark (it proved alive again) or the record goes away.

`on_leave(worker_id)` is called (on the refresh thread) for each worker whose record left the
registry, e.g. so that the prefix index forgets its blocks. `on_record(record)` is called for every
record taken (refresh and load channel), e.g. so that the prefix index fences a restarted worker
by its `start_id` (services/common/kv_index_follower.py) within one heartbeat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import orjson
import redis

from services.common.registry import WorkerRecord, WorkerRegistry
from services.router.workers import Role, WorkerInfo

log = logging.getLogger("swaserve.router.discovery")


class RedisWorkerPool:
    def __init__(
        self,
        redis_url: str,
        model: str | None = None,
        refresh_s: float = 0.5,
        registry: WorkerRegistry | None = None,
        on_leave: Callable[[str], None] | None = None,
        on_record: Callable[[WorkerRecord], None] | None = None,
    ) -> None:
        self.registry = registry or WorkerRegistry(redis_url)
        self.on_leave = on_leave
        self.on_record = on_record
        self.model = model
        self.refresh_s = refresh_s
        self._records: list[WorkerRecord] = []
        self._down: dict[str, float] = {}  # addr -> wall time it was marked down
        self._lock = threading.Lock()
        self.redis_errors = 0
        self.redis_ok = True
        self.version = 0  # bumped whenever what routable_records() returns may have changed
        self.last_refresh = 0.0
        self.load_updates = 0
        self.kept_missing = 0  # refreshes that kept records Redis had lost (within their TTL)
        self._left: dict[str, float] = {}  # worker_id -> when it announced it left
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="router-discovery", daemon=True)
        self._thread.start()
        self._sub_thread = threading.Thread(target=self._follow_loads, name="router-loads", daemon=True)
        self._sub_thread.start()

    # -- WorkerPool ----------------------------------------------------------------------------
    def prefill_workers(self) -> list[WorkerInfo]:
        return self._workers("prefill")

    def decode_workers(self) -> list[WorkerInfo]:
        return self._workers("decode")

    def mark_down(self, addr: str) -> None:
        with self._lock:
            self._down[addr] = time.time()
            self.version += 1

    def records(self, role: Role | None = None) -> list[WorkerRecord]:
        """The snapshot's live records (load fields included), for policies that score by load."""
        with self._lock:
            return [r for r in self._records if role is None or r.role == role]

    def routable_records(self, role: Role) -> list[WorkerRecord]:
        """The records of `role` not marked down: what the routing policy scores."""
        with self._lock:
            return [r for r in self._records if r.role == role and r.addr not in self._down]

    # -- snapshot ------------------------------------------------------------------------------
    def refresh(self) -> None:
        try:
            records = self.registry.list(model=self.model)
        except redis.RedisError as e:
            self.redis_errors += 1
            if self.redis_ok:
                log.warning("discovery: Redis unreachable (%s); routing with the last known workers", e)
            self.redis_ok = False
            return
        if not self.redis_ok:
            log.warning("discovery: Redis reachable again; %d workers", len(records))
        self.redis_ok = True
        now = time.time()
        with self._lock:
            scanned = {r.worker_id for r in records}
            self._left = {w: t for w, t in self._left.items() if now - t < 600}
            kept = [r for r in self._records if r.worker_id not in scanned and r.worker_id not in self._left
                    and r.ttl > 0 and r.updated_at + r.ttl > now]  # fmt: skip
            if kept:
                if not self.kept_missing:
                    log.warning("discovery: %d workers missing from Redis within their TTL (a Redis "
                                "restart?); kept until they write back or expire", len(kept))  # fmt: skip
                self.kept_missing += 1
            left = {r.worker_id for r in self._records} - scanned - {r.worker_id for r in kept}
            newer = {r.worker_id: r for r in self._records}  # a published record may beat the scan
            records = [_newest(r, newer.get(r.worker_id)) for r in records] + kept
            records.sort(key=lambda r: (r.role, r.worker_id))
            self._records = records
            live = {r.addr: r.updated_at for r in records}
            self._down = {a: t for a, t in self._down.items() if a in live and live[a] <= t}
            self.version += 1
        self.last_refresh = time.monotonic()
        self._tell_records(records)
        if self.on_leave is not None:
            self._tell_left(self.on_leave, sorted(left))

    def _tell_records(self, records: list[WorkerRecord]) -> None:
        if self.on_record is None:
            return
        for rec in records:
            try:
                self.on_record(rec)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop discovery
                log.exception("discovery: on_record(%s) failed", rec.worker_id)

    @staticmethod
    def _tell_left(listener: Callable[[str], None], worker_ids: list[str]) -> None:
        for worker_id in worker_ids:
            try:
                listener(worker_id)
            except Exception:  # noqa: BLE001 - a listener's bug must not stop discovery
                log.exception("discovery: on_leave(%s) failed", worker_id)

    def apply(self, rec: WorkerRecord) -> bool:
        """Take a record a worker published, if it is newer than the one held. A worker not in the
        snapshot waits for the next refresh (its key may be gone: a late publish never revives it)."""
        if self.model is not None and rec.model != self.model:
            return False
        with self._lock:
            for i, old in enumerate(self._records):
                if old.worker_id == rec.worker_id and old.role == rec.role:
                    if rec.updated_at <= old.updated_at:
                        return False
                    self._records = [*self._records[:i], rec, *self._records[i + 1 :]]
                    self.version += 1
                    self.load_updates += 1
                    break
            else:
                return False
        self._tell_records([rec])
        return True

    def forget(self, worker_id: str) -> None:
        """The worker announced it left: drop it now (and never keep it as 'missing')."""
        with self._lock:
            self._left[worker_id] = time.time()
            before = len(self._records)
            self._records = [r for r in self._records if r.worker_id != worker_id]
            gone = len(self._records) < before
            if gone:
                self.version += 1
        if gone and self.on_leave is not None:
            self._tell_left(self.on_leave, [worker_id])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.refresh_s + 2)
        self._sub_thread.join(timeout=3)

    def _follow_loads(self) -> None:
        """Apply every record published on the load channel; reconnect when Redis goes away."""
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self.registry.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.registry.channel)
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is None or msg.get("type") != "message":
                        continue
                    try:
                        data = orjson.loads(msg["data"])
                        if isinstance(data, dict) and "left" in data:
                            self.forget(str(data["left"]))
                            continue
                        if not isinstance(data, dict):
                            raise TypeError(f"a load message is a JSON object, not {type(data).__name__}")
                        rec = WorkerRecord.from_dict(data)  # parsed once
                    except (ValueError, TypeError) as e:
                        log.warning("discovery: skipping a malformed load message: %s", e)
                        continue
                    self.apply(rec)
            except redis.RedisError:
                self._stop.wait(self.refresh_s)  # the refresh loop logs the outage
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.RedisError:
                        pass

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def _workers(self, role: Role) -> list[WorkerInfo]:
        with self._lock:
            return [
                WorkerInfo(r.addr, role, r.model)
                for r in self._records
                if r.role == role and r.addr not in self._down
            ]


def _newest(rec: WorkerRecord, held: WorkerRecord | None) -> WorkerRecord:
    return held if held is not None and held.updated_at > rec.updated_at else rec
