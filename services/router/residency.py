"""Routing-time residency, router side: every routing decision becomes a pending entry of the
chosen prefill worker (services/common/pending_residency.py), in this replica's index at once and,
through one XADD to Redis, in every other replica's index within a stream read.

    decide --> record(rid, decision, prompt) --> index.add_pending (this replica, synchronous)
                                             \\-> writer thread: XADD {prefix}:pending (one per decision)
    failure / abort before the prefill ran --> drop(rid): index.drop_pending + XADD unpend

The entry announces what the worker will cache once the prefill finishes: the prompt's full pages
and the SWA pages before its end (and before a branch point the worker checkpoints: the chosen
worker's raw match beyond its window-safe match). Its TTL is the prefill's expected duration
(queued + uncached tokens at the worker's speed) times `pending_ttl_factor`, plus
`pending_ttl_base_s`, at most `pending_ttl_max_s`; the worker's own KV events replace it sooner.

While Redis is down nothing is written (decisions are load-only then: the index is unusable), and
what queued is dropped rather than replayed late; the follower rebuilds its pending entries from
the stream when Redis returns, so an entry only this replica held does not outlive the outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import redis

from services.common.block_hash import HASH_BYTES, ROOT_HASH, BlockHash, block_digests, hashes_of
from services.common.kv_event_wire import DEFAULT_PREFIX, KVKeys, make_client
from services.common.pending_residency import PendingEntry, swa_pages
from services.common.pending_wire import PendingMessage
from services.common.prefix_index import PrefixIndex
from services.router.page_hashes import PageHashes
from services.router.policy import PolicyConfig
from services.router.routing import Prompt, RoutingDecision

log = logging.getLogger("swaserve.router.residency")

MAX_QUEUE = 10_000  # messages waiting for Redis; beyond this the oldest are dropped


class RoutedResidency:
    def __init__(
        self,
        config: PolicyConfig,
        index: PrefixIndex,
        redis_url: str = "",
        prefix: str = DEFAULT_PREFIX,
        *,
        client: redis.Redis | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.clock = clock  # wall clock (deadlines); a simulation passes its own
        self.index = index
        self.key = KVKeys(prefix).pending
        self.max_ttl_ms = int(config.pending_ttl_max_s * 1000)
        self.redis = client if client is not None else (make_client(redis_url) if redis_url else None)
        self.recorded = 0
        self.dropped = 0
        self.write_errors = 0
        self.lost = 0  # messages not written (Redis down, queue full)
        self._queue: deque[PendingMessage] = deque()
        self._busy = False  # the writer thread holds a batch not yet written
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.redis is not None:
            self._thread = threading.Thread(target=self._run, name="router-residency", daemon=True)
            self._thread.start()

    # -- request path ----------------------------------------------------------------------------
    def record(self, rid: str, decision: RoutingDecision, prompt: Prompt) -> PendingEntry | None:
        """Announce the decision's prefill worker as the holder of the prompt (None: nothing to say,
        e.g. a prompt shorter than a page)."""
        cfg = self.config
        c = decision.prefill
        full, packed = whole_pages_packed(prompt, cfg.page_size)
        if not full:
            return None
        need = -(-cfg.window // cfg.page_size) if cfg.window else 0
        raw_pages = decision.raw_match_tokens // cfg.page_size
        branch = raw_pages if decision.raw_match_tokens > decision.safe_match_tokens else 0
        ttl_s = self.ttl_s(c.queued_tokens + decision.uncached_tokens, c.tokens_per_s)
        now = self.clock()
        entry = PendingEntry(rid, c.worker_id, full, swa_pages(full, need, branch), now + ttl_s,
                             c.incarnation, decision.uncached_tokens, now)  # fmt: skip
        if not self.index.add_pending(entry):
            return None
        self.recorded += 1
        self._send(PendingMessage.of(entry, int(ttl_s * 1000), packed))
        return entry

    def drop(self, rid: str, worker_id: str) -> None:
        """The request will not be prefilled there (failed, aborted): withdraw its entry."""
        if self.index.drop_pending(rid):
            self.dropped += 1
            self._send(PendingMessage("unpend", rid, worker_id))

    def ttl_s(self, work_tokens: int, tokens_per_s: float) -> float:
        cfg = self.config
        tps = tokens_per_s or cfg.prefill_tokens_per_s
        return min(cfg.pending_ttl_max_s, cfg.pending_ttl_base_s + cfg.pending_ttl_factor * work_tokens / tps)

    # -- writer thread ---------------------------------------------------------------------------
    def _send(self, msg: PendingMessage) -> None:
        if self.redis is None:
            return
        with self._cond:
            self._queue.append(msg)
            if len(self._queue) > MAX_QUEUE:
                self._queue.popleft()
                self.lost += 1
            self._cond.notify()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every message handed over so far was written (or given up)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _run(self) -> None:
        assert self.redis is not None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
                self._busy = True
            try:
                self._write(batch)
            except redis.RedisError as e:
                self.write_errors += 1
                self.lost += len(batch)
                if self.write_errors == 1 or self.write_errors % 100 == 0:
                    log.warning("residency: could not write %d pending entries (%s); dropped", len(batch), e)
                with self._cond:  # stale by the time Redis answers: drop what queued meanwhile
                    self.lost += len(self._queue)
                    self._queue.clear()
                    self._cond.wait(0.2)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, batch: Sequence[PendingMessage]) -> None:
        assert self.redis is not None
        now_ms = int(time.time() * 1000)
        p: Any = self.redis.pipeline(transaction=False)
        for msg in batch:  # each XADD is one atomic entry; the pipeline only saves round trips
            p.xadd(self.key, msg.to_fields(), minid=str(max(0, now_ms - self.max_ttl_ms)), approximate=True)
        p.execute()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=3.0)
        if self.redis is not None:
            self.redis.close()


def whole_pages_packed(prompt: Prompt, page_size: int) -> tuple[tuple[BlockHash, ...], bytes]:
    """The hashes of every whole page of the prompt (what its prefill caches: the routing hashes,
    plus the last page when the prompt is page-aligned, as routing stops one page early), and the
    same hashes in pending_wire's encoding (16 big-endian bytes each),
    taken from the hash chain's own bytes when the prompt's hashes are a PageHashes (else b"":
    the writer packs them)."""
    pages = len(prompt.token_ids) // page_size
    routed = prompt.block_hashes
    lazy = isinstance(routed, PageHashes)
    if isinstance(routed, PageHashes):  # (mypy narrows on the call, not on `lazy`)
        have, packed = list(routed.all()), routed.packed()
    else:
        have, packed = list(routed), b""
    if pages > len(have):
        parent = have[-1] if have else ROOT_HASH
        more = block_digests(
            prompt.token_ids[len(have) * page_size : pages * page_size], page_size, parent=parent
        )
        have += hashes_of(more)
        packed += more if lazy else b""
    return tuple(have[:pages]), packed[: pages * HASH_BYTES]


__all__ = ["RoutedResidency", "whole_pages_packed"]
