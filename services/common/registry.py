"""Worker discovery through Redis: each worker registers a record with a TTL and keeps it alive.

    key    swaserve:workers:<role>:<worker_id>      (the prefix is configurable)
    value  WorkerRecord as JSON: who it is (role, addr, model, capacity) and its load, refreshed
           by the heartbeat (running, waiting, free_kv_tokens, queued_tokens)
    TTL    `ttl` seconds, refreshed every `ttl / 3`: a worker that dies is gone within one TTL
    channel swaserve:workers:load                   (PUBLISH of the same JSON on every write)

A worker that stops cleanly PUBLISHes {"left": worker_id} before deleting its key. A record that
vanished without that (Redis restarted and lost it) is still live for routers until its own
`updated_at + ttl` (services/router/discovery.py), and the next heartbeat (within ttl / 3; every
0.5 s after a failed write) writes it back. So a Redis restart costs no routable worker.

A load that only the heartbeat carried would be up to `ttl / 3` old when the router reads it, long
enough to send a conversation's next turn away from the worker holding its prefix because that
worker "was busy" two seconds ago. So the worker also calls `notify()` whenever its load may have
changed (after every engine step): the record is rewritten and published at once when the worker
became idle, else at most every `min_gap` seconds. Routers subscribe to the channel
(services/router/discovery.py) and so see loads milliseconds old, all replicas alike.

Redis holds no other copy, so a Redis restart loses every record and the next heartbeat of each
worker writes it back. A heartbeat that cannot reach Redis logs and retries; it never raises into
the worker. No torch here: the router uses this module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import redis

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "swaserve:workers"
LOAD_FIELDS = ("running", "waiting", "free_kv_tokens", "queued_tokens")


@dataclass(frozen=True)
class WorkerRecord:
    role: str  # "prefill" | "decode" | ...
    addr: str  # gRPC host:port the router dials
    model: str  # the model name the worker was started with
    capacity_tokens: int  # KV tokens the worker's full pool holds
    metrics_addr: str = ""  # host:port of its /metrics, "" if none
    worker_id: str = ""  # unique per worker; defaults to addr
    running: int = 0
    waiting: int = 0
    free_kv_tokens: int = 0
    queued_tokens: int = 0  # prompt tokens admitted but not computed yet
    started_at: float = 0.0  # wall clock (time.time())
    updated_at: float = 0.0  # wall clock of the last heartbeat
    ttl: float = 0.0  # the record's TTL in Redis: it is live until updated_at + ttl unless it left
    start_id: str = ""  # the process's incarnation: new at every start, also its KV events' epoch
    labels: dict[str, str] = field(default_factory=dict)  # e.g. length bucket, kv transports

    def __post_init__(self) -> None:
        for name in ("role", "addr", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"WorkerRecord.{name} must be a non-empty string")
        if ":" in self.role:
            raise ValueError("WorkerRecord.role must not contain ':'")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", self.addr)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> WorkerRecord:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WorkerRecord:
        """A record from its parsed JSON (fields this version does not know are ignored)."""
        return cls(**{k: v for k, v in raw.items() if k in _FIELDS})


_FIELDS = frozenset(f.name for f in fields(WorkerRecord))

LoadFn = Callable[[], Mapping[str, int]]


class WorkerRegistry:
    """register() / deregister() on the worker side, list() on the router side."""

    def __init__(
        self,
        redis_url: str,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = 6.0,
        client: redis.Redis | None = None,
        min_gap: float = 0.05,
    ) -> None:
        if ttl <= 0:
            raise ValueError("ttl must be > 0")
        if min_gap < 0:
            raise ValueError("min_gap must be >= 0")
        self.prefix = prefix.rstrip(":")
        self.ttl = ttl
        self.interval = ttl / 3
        self.min_gap = min_gap
        self.channel = f"{self.prefix}:load"
        self._wake = threading.Event()
        self._last_load: dict[str, int] | None = None
        self._last_write = 0.0  # monotonic
        self.writes = 0
        self.redis = client or redis.Redis.from_url(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._record: WorkerRecord | None = None
        self._load_fn: LoadFn | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._healthy = True

    def key(self, role: str, worker_id: str) -> str:
        return f"{self.prefix}:{role}:{worker_id}"

    # -- worker side ---------------------------------------------------------------------------
    def register(self, record: WorkerRecord, load_fn: LoadFn | None = None, strict: bool = False) -> None:
        """Write the record now and keep it alive in a thread.

        If Redis is unreachable now: strict raises; otherwise the heartbeat keeps trying (a worker
        may start before its Redis).
        """
        if self._thread is not None:
            raise RuntimeError("already registered; deregister() first")
        now = time.time()
        self._record = replace(record, started_at=record.started_at or now, ttl=self.ttl)
        self._load_fn = load_fn
        try:
            self._write()
        except redis.RedisError as e:
            if strict:
                raise
            log.warning("registry: Redis unreachable at registration (%s); the heartbeat keeps trying", e)
            self._healthy = False
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="registry-heartbeat", daemon=True)
        self._thread.start()

    def deregister(self) -> None:
        """Stop the heartbeat and delete the record (best effort: a dead Redis forgets it anyway)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
            self._thread = None
        rec, self._record = self._record, None
        if rec is not None:
            try:
                # say so first: routers drop it now, not when its TTL would have run out
                self.redis.publish(self.channel, json.dumps({"left": rec.worker_id, "role": rec.role}))
                self.redis.delete(self.key(rec.role, rec.worker_id))
            except redis.RedisError as e:
                log.warning("registry: could not delete %s: %s", rec.worker_id, e)

    def notify(self) -> None:
        """The worker's load may have changed: write it soon (see the module doc). Cheap, any thread."""
        self._wake.set()

    def _load(self) -> dict[str, int]:
        if self._load_fn is None:
            return {}
        load = self._load_fn()
        return {k: int(load[k]) for k in LOAD_FIELDS if k in load}

    def _write(self, load: dict[str, int] | None = None) -> None:
        assert self._record is not None
        load = self._load() if load is None else load
        fields_: dict[str, Any] = {**load, "updated_at": time.time()}
        rec = replace(self._record, **fields_)
        text = rec.to_json()
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(self.key(rec.role, rec.worker_id), text, px=int(self.ttl * 1000))
        pipe.publish(self.channel, text)
        pipe.execute()
        self._last_load, self._last_write = load, time.monotonic()
        self.writes += 1

    def _due(self) -> dict[str, int] | None:
        """The load to write now, or None: on the heartbeat's period always; on a notify when the
        load changed and either the worker went idle or `min_gap` passed since the last write."""
        load = self._load()
        since = time.monotonic() - self._last_write
        if since >= self.interval:
            return load
        if load == self._last_load:
            return None
        idle = not load.get("running") and not load.get("waiting") and not load.get("queued_tokens")
        if idle or since >= self.min_gap:
            return load
        self._wake.set()  # not yet: look again after the gap
        self._stop.wait(self.min_gap - since)
        return None

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(max(0.0, self.interval - (time.monotonic() - self._last_write)))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                load = self._due()
                if load is None:
                    continue
                self._write(load)
            except Exception as e:  # noqa: BLE001 - a heartbeat never takes the worker down
                # retry soon (not in a spin): a restarted Redis gets the record back quickly
                self._last_write = time.monotonic() - self.interval + min(self.interval, 0.5)
                if self._healthy:
                    log.warning(
                        "registry: heartbeat to Redis failed (%s); retrying every %.1fs", e, self.interval
                    )
                self._healthy = False
            else:
                if not self._healthy:
                    log.warning("registry: Redis reachable again; record restored")
                self._healthy = True

    @property
    def healthy(self) -> bool:
        """Whether the last heartbeat reached Redis."""
        return self._healthy

    # -- router side ---------------------------------------------------------------------------
    def list(self, role: str | None = None, model: str | None = None) -> list[WorkerRecord]:
        """Live workers (their TTL not expired), sorted by (role, worker_id). Raises on Redis errors."""
        pattern = f"{self.prefix}:{role}:*" if role else f"{self.prefix}:*"
        keys = list(self.redis.scan_iter(match=pattern, count=500))
        if not keys:
            return []
        out: list[WorkerRecord] = []
        values: list[Any] = self.redis.mget(keys)  # type: ignore[assignment]
        for key, value in zip(keys, values, strict=True):
            if value is None:
                continue  # expired between SCAN and MGET
            try:
                rec = WorkerRecord.from_json(value)
            except (ValueError, TypeError) as e:
                log.warning("registry: skipping malformed record %r: %s", key, e)
                continue
            if model is None or rec.model == model:
                out.append(rec)
        return sorted(out, key=lambda r: (r.role, r.worker_id))

    def close(self) -> None:
        self.deregister()
        self.redis.close()
