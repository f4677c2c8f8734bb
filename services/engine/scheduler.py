"""Continuous batching with chunked prefill, over the two page pools and the radix cache.

Each step builds one batch of (request, end) pairs, packed into a single forward:
  1. running requests, oldest first: a decoding request computes its one new token, a request
     still in prefill computes its next chunk (at most `chunk_size` tokens);
  2. then waiting requests in the queue policy's order are admitted while the step's token budget,
     the running limit and the pools allow. Admission matches the prompt against the radix cache
     (window-safe: only prefixes whose SWA tail is present count), adopts those pages and locks
     the node, and requires free-or-evictable full pages for the whole uncached prompt.
With a host tier (L2, kv/host_tier.py), admission extends the L1 match with pages restored from
host memory (full pages plus the SWA tail at the restored end: window-safe), and every prefix the
radix cache takes is also written through to L2. The copies themselves are jobs the engine runs:
`RestoreJob`s on the request before the forward, `SpillJob`s in `spills` after the step.
A prompt whose full-attention KV matches further than its window-safe prefix (raw_len > safe_len:
another sequence branched off there, e.g. a shared system prompt, and its SWA window at that
point is gone) gets a checkpoint at raw_len: its prefill chunk stops there once, and the prefix is
inserted with the SWA tail it just computed, so the next request with that prefix hits it.
When a step cannot get pages, the radix cache is evicted first (SWA tombstones before whole
nodes); if that is not enough the most recently admitted running request is preempted: its pages
are released and it goes back to the front of the queue to be recomputed (its output so far is
kept, so greedy results do not change).

Bookkeeping only: no tensors here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.common.block_hash import ROOT_HASH, BlockHash, hash_blocks
from services.engine.kv.host_tier import HostHit, HostTier, RestoreJob, SpillJob
from services.engine.kv.page_pool import OutOfPages, PagePool
from services.engine.kv.radix_cache import MatchResult, RadixCache
from services.engine.kv.req_pages import ReqPages, StepSlots, align_down, swa_keep_start
from services.engine.queue_policy import QueuePolicy
from services.engine.request import Req, ReqStatus


@dataclass(frozen=True)
class SchedulerConfig:
    page_size: int
    window: int  # SWA window of the model (previous tokens seen); any value if no SWA layers
    chunk_size: int = 512
    max_batch_tokens: int = 2048
    max_running: int = 64
    enable_prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("page_size", "chunk_size", "max_batch_tokens", "max_running"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True)
class ScheduledStep:
    req: Req
    slots: StepSlots

    @property
    def num_tokens(self) -> int:
        return self.slots.end - self.slots.start

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its last position is sampled."""
        return self.slots.end == self.req.seq_len


class Scheduler:
    def __init__(
        self,
        cfg: SchedulerConfig,
        full_pool: PagePool,
        swa_pool: PagePool,
        cache: RadixCache,
        policy: QueuePolicy,
        clock: Callable[[], float] = time.monotonic,
        host: HostTier | None = None,
    ) -> None:
        self.cfg = cfg
        self.full_pool, self.swa_pool, self.cache = full_pool, swa_pool, cache
        self.host = host if cfg.enable_prefix_cache else None
        self.spills: list[SpillJob] = []  # write-through copies the engine runs after the step
        self.policy = policy
        self.clock = clock
        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.num_preemptions = 0

    # -- queue ---------------------------------------------------------------------------------
    def add(self, req: Req) -> None:
        self.waiting.append(req)

    def add_running(self, req: Req) -> None:
        """A request whose KV was installed from elsewhere: it decodes from the next step on."""
        req.status = ReqStatus.RUNNING
        self.running.append(req)
        req.check()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def uncached_tokens(self, req: Req) -> int:
        if not self.cfg.enable_prefix_cache:
            return req.seq_len
        return req.seq_len - self.cache.match(req.all_ids[: req.seq_len - 1]).safe_len

    # -- one step ------------------------------------------------------------------------------
    def schedule(self) -> list[ScheduledStep]:
        budget = self.cfg.max_batch_tokens
        batch: list[ScheduledStep] = []
        for req in list(self.running):
            if req.status is not ReqStatus.RUNNING or budget <= 0:
                continue
            n = self._chunk(req, budget)
            slots = self._plan(req, req.computed_len + n, batch)
            if slots is None:
                continue  # req itself was preempted
            batch.append(ScheduledStep(req, slots))
            budget -= n
        self._admit(batch, budget)
        return batch

    def _admit(self, batch: list[ScheduledStep], budget: int) -> None:
        if not self.waiting:
            return
        ordered = self.policy.order(self.waiting, self.clock(), self.uncached_tokens)
        for req in ordered:
            if budget <= 0 or len(self.running) >= self.cfg.max_running:
                break
            if not self._try_admit(req):
                break  # head of the queue does not fit: wait for pages rather than jump it
            n = self._chunk(req, budget)
            slots = self._plan(req, req.computed_len + n, batch)
            if slots is None:
                break
            batch.append(ScheduledStep(req, slots))
            budget -= n

    def _try_admit(self, req: Req) -> bool:
        p = self.cfg.page_size
        pages = ReqPages(self.full_pool, self.swa_pool, self.cfg.window)
        match = None
        if self.cfg.enable_prefix_cache:
            match = self.cache.match(req.all_ids[: req.seq_len - 1])
        cached = match.safe_len if match else 0
        need_full = -(-req.seq_len // p) - cached // p
        if need_full > self.full_pool.num_free + self.cache.evictable_full_pages():
            return False
        if match is not None and cached:
            self.cache.lock(match.node)  # before anything below may evict
            req.cache_node = match.node
        restored = req.cached_l3 = 0
        if match is not None and self.host is not None:
            restored = self._restore(req, pages, match, cached)
        if restored == 0 and match is not None and cached:
            pages.adopt_prefix(cached, match.full_pages, match.swa_pages)
        req.pages = pages
        req.cached_l2 = restored - req.cached_l3
        cached += restored
        req.cached_len = req.computed_len = cached
        req.checkpoint = 0
        if match is not None and cached < match.raw_len < req.seq_len:
            req.checkpoint = match.raw_len  # page-aligned: a branch point without its SWA tail
        req.status = ReqStatus.RUNNING
        self.waiting.remove(req)
        self.running.append(req)
        req.check()
        return True

    def _chunk(self, req: Req, budget: int) -> int:
        """Tokens of req's next step: a chunk, cut at its checkpoint if it has one ahead."""
        n = min(req.seq_len - req.computed_len, self.cfg.chunk_size, budget)
        if req.computed_len < req.checkpoint:
            n = min(n, req.checkpoint - req.computed_len)
        return n

    def _restore(self, req: Req, pages: ReqPages, match: MatchResult, cached: int) -> int:
        """Extend the L1 prefix from L2 if it has more; returns the tokens restored (0: none)."""
        assert self.host is not None
        p = self.cfg.page_size
        hashes = self.page_hashes(req, req.seq_len - 1)  # the last token is always computed
        hit: HostHit | None = self.host.lookup(hashes, cached // p)
        if hit is None:
            return 0
        for attempt in range(2):
            try:
                new_full, new_swa = pages.restore_prefix(cached, match.full_pages[: cached // p], hit.end * p)
                break
            except OutOfPages:
                if attempt or not self._evict(hit.end - cached // p, hit.end - hit.tail_first):
                    return 0
        req.restore = RestoreJob(hit.full, tuple(new_full), hit.tail, tuple(new_swa))
        self.host.use(hashes, hit)
        if req.l3_span is not None:  # pages an L3 lookup put into L2 for this request count as L3
            lo, hi = max(req.l3_span[0], cached // p), min(req.l3_span[1], hit.end)
            req.cached_l3 = max(0, hi - lo) * p
        return hit.end * p - cached

    def beyond_host(self, req: Req) -> tuple[list[BlockHash], int, int] | None:
        """Where a lookup in a tier below L2 (L3) would start for req: (its page hashes, the first
        page neither L1 nor L2 can restore, how many pages L2 can take in at once), or None if
        there is nothing past them (or no room). Read-only."""
        assert self.host is not None
        p = self.cfg.page_size
        usable = (req.seq_len - 1) // p  # the last token is always computed
        hashes = self.page_hashes(req, req.seq_len - 1)
        have = l1 = self.cache.match(req.all_ids[: req.seq_len - 1]).safe_len // p
        hit = self.host.lookup(hashes, have)
        if hit is not None:
            have = hit.end
        room = self.host.full_pool.num_pages - (have - l1)  # L2 must hold what it restores at once
        if usable <= have or room <= 0:
            return None
        return hashes, have, room

    def page_hashes(self, req: Req, num_tokens: int) -> list[BlockHash]:
        """Block hashes of req's full pages within [0, num_tokens), extending req.page_hashes."""
        p = self.cfg.page_size
        have = req.page_hashes
        want = num_tokens // p
        if len(have) < want:
            parent = BlockHash(have[-1]) if have else ROOT_HASH
            have += hash_blocks(req.all_ids[len(have) * p : want * p], p, parent=parent)
        return [BlockHash(h) for h in have[:want]]

    def _write_down(self, req: Req, length: int, full: list[int], swa: list[int | None]) -> None:
        """Write-through of a prefix the radix cache just took: new full pages, and its SWA tail."""
        assert self.host is not None
        p = self.cfg.page_size
        n = length // p
        hashes = self.page_hashes(req, length)
        dev: list[int] = []
        host: list[int] = []
        keys: list[BlockHash] = []
        tokens = req.all_ids  # a new list on every read: once here, not once per page
        for i in range(n):
            hp = self.host.store_full_at(hashes, i, tokens)
            if hp is not None:
                dev.append(full[i])
                host.append(hp)
                keys.append(hashes[i])
        if dev:
            self.spills.append(SpillJob("full", tuple(dev), tuple(host), tuple(keys)))
        tail = swa[swa_keep_start(length, p, self.cfg.window) // p : n]
        if tail and all(pg is not None for pg in tail):
            hps = self.host.store_tail_at(hashes, n, tokens)
            if hps is not None:
                dev_tail = tuple(pg for pg in tail if pg is not None)
                self.spills.append(SpillJob("swa", dev_tail, hps, (hashes[n - 1],)))

    def _plan(self, req: Req, end: int, batch: list[ScheduledStep]) -> StepSlots | None:
        """Pages for req's step to `end`, evicting and then preempting as needed.

        Returns None if req itself had to be preempted.
        """
        pages: ReqPages = req.pages
        while True:
            try:
                return pages.plan_step(end)
            except OutOfPages:
                full, swa = pages.new_pages_needed(end)
                if self._evict(full, swa):
                    continue
                victim = self.running[-1]
                self.preempt(victim, batch)
                if victim is req:
                    return None

    def _evict(self, full: int, swa: int) -> bool:
        short_full = max(0, full - self.full_pool.num_free)
        short_swa = max(0, swa - self.swa_pool.num_free)
        freed = 0
        if short_swa:
            freed += self.cache.evict_swa(short_swa)
        if short_full:
            freed += self.cache.evict_full(short_full)
        return freed > 0

    def preempt(self, req: Req, batch: list[ScheduledStep]) -> None:
        """Release req's pages and put it back at the front of the queue for recomputation."""
        for i, st in enumerate(batch):
            if st.req is req:
                del batch[i]
                break
        self._release(req)
        req.cached_len = req.computed_len = req.cached_l2 = req.cached_l3 = req.checkpoint = 0
        req.restore = None
        req.status = ReqStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.running.remove(req)
        self.waiting.insert(0, req)

    # -- after the forward ---------------------------------------------------------------------
    def commit(self, step: ScheduledStep) -> None:
        req = step.req
        req.pages.commit_step(step.slots.end)
        req.computed_len = step.slots.end
        if req.checkpoint and req.computed_len == req.checkpoint and self.cfg.enable_prefix_cache:
            self._cache_prefix(req, req.all_ids[: req.checkpoint])  # the branch point, with its tail
            req.checkpoint = 0
        if self.cfg.enable_prefix_cache and not req.prompt_tail_cached and req.computed_len >= req.prompt_len:
            self._cache_prefix(req, req.prompt_ids)
            req.prompt_tail_cached = True

    def finish(self, req: Req) -> None:
        """req has finished: hand its KV to the radix cache, release its own references."""
        if self.cfg.enable_prefix_cache and req.pages is not None:
            self._cache_prefix(req, req.all_ids[: req.computed_len])
        self._release(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)

    def _cache_prefix(self, req: Req, tokens: list[int]) -> None:
        length = align_down(min(len(tokens), req.computed_len), self.cfg.page_size)
        if length == 0:
            return
        full, swa = req.pages.prefix_pages(length)
        result = self.cache.insert(tokens[:length], full, swa)
        self.cache.lock(result.node)
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
        req.cache_node = result.node
        if self.host is not None:
            self._write_down(req, length, full, swa)

    def _release(self, req: Req) -> None:
        if req.cache_node is not None:
            self.cache.unlock(req.cache_node)
            req.cache_node = None
        if req.pages is not None:
            req.pages.release_all()
            req.pages = None
