"""The transport-free routing entry: prompt token ids + candidates -> RoutingDecision.

    prompt ids --hash_blocks--> block hashes --index.match--> PrefixHit per worker
                (hashed as far as the match reads them: page_hashes.py)
    prefill candidates --prefill Profile--> ranking ----\
    decode candidates  --decode Profile---> ranking -----+--> RoutingDecision

The decode ranking reads no block hash (decode workers keep no prompt cache that the router
follows): `rank_decode` needs only the prompt's length and key, so the dispatcher can send Reserve
while the prompt is still being hashed, and pass the ranking to `decide`.

Everything a decision reads is shared state: the candidates' loads come from the Redis registry,
the prefix index from the workers' KV events in Redis, ties are broken by a hash of the prompt (of
its first page beyond what every candidate holds, `anchor_key`: siblings of a new prefix tie alike).
Two router replicas with the same Redis state decide the same for the same request. The one
exception is by design: a replica's own pending entries (routing-time residency, residency.py)
are in its index at once, the other replicas' after one stream read (milliseconds).

The index is used only while it is ready and its Redis is reachable. Otherwise (Redis down, the
follower still catching up, no index configured) decisions are load-only, from the last registry
snapshot, with reason `index_unavailable` / `no_index`; the change is logged once each way.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from services.common.block_hash import HASH_BYTES, BlockHash
from services.common.prompt_wire import pack_ids, token_array
from services.common.registry import WorkerRecord
from services.router.page_hashes import PageHashes
from services.router.policy import Candidate, PolicyConfig, PrefixHit, Profile, RouteRequest
from services.router.policy.base import NO_HIT
from services.router.workers import Role, WorkerPool

log = logging.getLogger("swaserve.router.routing")

REASONS = ("cache_hit", "load_over_cache", "cache_miss", "index_unavailable", "no_index")


class PrefixIndexLike(Protocol):
    """services.common.prefix_index.PrefixIndex as the router uses it."""

    def match(
        self, block_hashes: Sequence[BlockHash], workers: Iterable[str] | None = None
    ) -> Mapping[str, Any]:
        """worker_id -> an object with `raw_blocks` and `safe_blocks` (WorkerMatch)."""
        ...


class IndexSource(Protocol):
    """services.common.kv_event_bus.KVIndexFollower as the router uses it."""

    @property
    def index(self) -> PrefixIndexLike: ...

    @property
    def ready(self) -> Any: ...  # bool (or an Event, or a method returning bool)

    @property
    def redis_ok(self) -> Any: ...


class NoCandidate(Exception):
    def __init__(self, role: str) -> None:
        super().__init__(f"no {role} worker is available")
        self.role = role


@dataclass(frozen=True)
class Prompt:
    """A prompt hashed once per request (the hashes serve every retry and every choice), each
    page when first read (page_hashes.PageHashes)."""

    token_ids: Sequence[int]
    block_hashes: Sequence[BlockHash]  # the usable pages (see prepare)
    key: bytes  # prompt_key: identifies the whole prompt, the partial last page included


def prompt_key(packed: bytes) -> bytes:
    """What identifies a prompt in tie-breaks (pick.tiebreak): its length and the CRC-32 of its
    packed ids (prompt_wire.pack_ids). Tens of microseconds for 32k tokens, so that the decode
    choice does not wait for the page hashes; a collision only shares a tie-break order."""
    return (len(packed) // 4).to_bytes(4, "big") + zlib.crc32(packed).to_bytes(4, "big")


@dataclass(frozen=True)
class RoutingDecision:
    prefill: Candidate
    decode: Candidate  # the first to ask; Reserve falls through decode_ranking
    uncached_tokens: int  # prompt tokens the chosen prefill worker is expected to compute
    raw_match_tokens: int  # its cached prefix with full-attention KV (not routable by itself)
    safe_match_tokens: int  # its window-safe cached prefix
    reason: str  # one of REASONS
    prompt_tokens: int
    bucket: str = ""
    bucket_fallback: str = ""  # the prompt's own bucket, when a nearer one had to serve it
    prefill_ranking: tuple[Candidate, ...] = ()
    decode_ranking: tuple[Candidate, ...] = ()
    scores: Mapping[str, float] | None = None  # prefill scores by worker_id

    @property
    def raw_match_fraction(self) -> float:
        return self.raw_match_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def safe_match_fraction(self) -> float:
        return self.safe_match_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class RoutingPipeline:
    def __init__(
        self,
        config: PolicyConfig,
        index: IndexSource | None = None,
        model: str = "",
        l2_index: IndexSource | None = None,
    ) -> None:
        self.config = config
        self.index = index
        self.l2_index = l2_index  # the workers' host tiers: a one-page window (engine kv/host_tier.py)
        self.model = model
        self.prefill_profile = Profile.build("prefill", config.prefill_spec(), config)
        self.decode_profile = Profile.build("decode", config.decode_spec(), config)
        self._reads_l2 = self.prefill_profile.reads_l2  # else the L2 index is never matched
        self._reads_pages = any(
            ws.plugin.name == "cache_room" and ws.weight for ws in self.prefill_profile.scorers
        )
        self.index_errors = 0
        self._usable_last: bool | None = None

    def prepare(self, prompt_ids: Sequence[int], key: bytes | None = None) -> Prompt:
        """The prompt with its page hashes, computed as far as the index reads them (an
        array("I") is hashed without a conversion). `key`: its prompt_key if already known."""
        ps = self.config.page_size
        ids = token_array(prompt_ids)
        # A worker always computes the prompt's last token, so it resumes at most at page
        # floor((n - 1) / P): a page-aligned prompt's last page is never a usable hit (and its
        # window-safety is judged one page earlier). Matching it would credit a worker with a
        # whole prompt it recomputes (an exact repeat whose SWA tail starts at n - W).
        usable = PageHashes(ids, ps, (len(ids) - 1) // ps if ids else 0)
        return Prompt(prompt_ids, usable, prompt_key(pack_ids(ids)) if key is None else key)

    def rank_decode(
        self,
        prompt_len: int,
        key: bytes,
        decode: Sequence[Candidate],
        *,
        max_tokens: int = 0,
        exclude: Collection[str] = (),
    ) -> tuple[Candidate, ...]:
        """The decode workers to ask, best first (empty: none); no block hash needed."""
        req = RouteRequest(
            prompt_len=prompt_len,
            max_tokens=max_tokens,
            block_hashes=(),
            page_size=self.config.page_size,
            key=key,
            model=self.model,
        )
        return self.decode_profile.rank(req, _avoid(decode, exclude)).ordered

    def decide(
        self,
        prompt: Prompt | Sequence[int],
        prefill: Sequence[Candidate],
        decode: Sequence[Candidate],
        *,
        max_tokens: int = 0,
        exclude: Collection[str] = (),
        decode_ranking: Sequence[Candidate] | None = None,
    ) -> RoutingDecision:
        """Rank both roles. `exclude`: addresses that failed this request, avoided if others remain.
        `decode_ranking`: `rank_decode`'s answer for this prompt, if already asked (`decode` is then
        not read). Raises NoCandidate when a role has no worker (prefill checked first)."""
        p = prompt if isinstance(prompt, Prompt) else self.prepare(prompt)
        usable = self.index_usable()
        matches = self._matches(p.block_hashes) if usable else {}
        req = RouteRequest(
            prompt_len=len(p.token_ids),
            max_tokens=max_tokens,
            block_hashes=p.block_hashes,
            page_size=self.config.page_size,
            key=anchor_key(p, matches, prefill),
            matches=matches,
            cached_pages=self._cached_pages() if usable and self._reads_pages else {},
            index_usable=usable,
            model=self.model,
        )
        if usable:
            prefill = self._with_pending_load(prefill)
        pre = self.prefill_profile.rank(req, _avoid(prefill, exclude))
        if decode_ranking is None:
            decode_ranking = self.rank_decode(
                req.prompt_len, p.key, decode, max_tokens=max_tokens, exclude=exclude
            )
        if pre.best is None:
            raise NoCandidate("prefill")
        if not decode_ranking:
            raise NoCandidate("decode")
        hit = req.hit(pre.best)
        safe = req.tokens(hit.safe_blocks)
        return RoutingDecision(
            prefill=pre.best,
            decode=decode_ranking[0],
            uncached_tokens=req.prompt_len - min(safe, req.prompt_len - 1),
            raw_match_tokens=req.tokens(hit.raw_blocks),
            safe_match_tokens=safe,
            reason=self._reason(req, pre.ordered, hit.safe_blocks),
            prompt_tokens=req.prompt_len,
            bucket=pre.notes.get("bucket", ""),
            bucket_fallback=pre.notes.get("bucket_fallback", ""),
            prefill_ranking=pre.ordered,
            decode_ranking=tuple(decode_ranking),
            scores=pre.scores,
        )

    def _cached_pages(self) -> dict[str, int]:
        pages = getattr(getattr(self.index, "index", None), "cached_pages", None)
        return pages() if pages is not None else {}

    def _with_pending_load(self, cands: Sequence[Candidate]) -> Sequence[Candidate]:
        """Each worker's load plus the tokens routed to it (pending entries, this replica's and the
        others') after its last load report: a burst's decisions see each other at once, not when
        the worker next publishes (at most every 50 ms: services/common/registry.py)."""
        idx = getattr(self.index, "index", None)
        tokens = getattr(idx, "pending_tokens", None)
        if tokens is None or not len(getattr(idx, "pending", ())):
            return cands
        out = []
        for c in cands:
            extra = tokens(c.worker_id, c.updated_at) if c.has_load else 0
            out.append(replace(c, queued_tokens=c.queued_tokens + extra) if extra else c)
        return out

    def index_usable(self) -> bool:
        src = self.index
        usable = src is not None and _usable(src)
        if src is not None and usable != self._usable_last:
            if usable:
                log.warning("routing: prefix index usable; cache-aware routing on")
            else:
                log.warning("routing: prefix index not usable (Redis down or catching up); load-only routing")
            self._usable_last = usable
        return usable

    def _matches(self, hashes: Sequence[BlockHash]) -> dict[str, PrefixHit]:
        if not hashes or self.index is None:
            return {}
        try:
            raw = self.index.index.match(hashes)
        except Exception:  # noqa: BLE001 - a broken index degrades to load-only, never fails a request
            self.index_errors += 1
            log.exception("routing: prefix index match failed; routing this request by load")
            return {}
        l2 = self._l2_matches(hashes) if self._reads_l2 else {}
        hits = {
            w: PrefixHit(int(m.raw_blocks), int(m.safe_blocks), int(getattr(m, "l2_blocks", 0)))
            for w, m in raw.items()
        }
        for w, safe in l2.items():  # restorable from the worker's host tier, past its L1 hit
            h = hits.get(w, PrefixHit())
            if safe > h.safe_blocks:
                hits[w] = PrefixHit(h.raw_blocks, h.safe_blocks, max(h.l2_blocks, safe))
        return hits

    def _l2_matches(self, hashes: Sequence[BlockHash]) -> dict[str, int]:
        src = self.l2_index
        if src is None or not _usable(src):
            return {}
        try:
            return {w: int(m.safe_blocks) for w, m in src.index.match(hashes).items()}
        except Exception:  # noqa: BLE001 - a broken L2 index only loses the L2 credit
            self.index_errors += 1
            log.exception("routing: L2 index match failed; no L2 credit for this request")
            return {}

    def _reason(self, req: RouteRequest, ranked: Sequence[Candidate], chosen_safe: int) -> str:
        if self.index is None:
            return "no_index"
        if not req.index_usable:
            return "index_unavailable"
        best = max((req.hit(c).safe_blocks for c in ranked), default=0)
        if best == 0:
            return "cache_miss"
        return "cache_hit" if chosen_safe == best else "load_over_cache"


def _avoid(cands: Sequence[Candidate], exclude: Collection[str]) -> list[Candidate]:
    if not exclude:
        return list(cands)
    return [c for c in cands if c.addr not in exclude] or list(cands)


def policy_reads_l2(config: PolicyConfig) -> bool:
    """Whether the prefill policy uses host-tier (L2) matches: only then is an L2 index followed."""
    return Profile.build("prefill", config.prefill_spec(), config).reads_l2


def anchor_key(p: Prompt, matches: Mapping[str, PrefixHit], cands: Sequence[Candidate]) -> bytes:
    """The prefill tie-break's seed. For a prompt whose cached prefix is the same on every candidate
    (nothing, or a system prompt all of them hold), the hash of its first page beyond that prefix;
    otherwise (or with no full page) the prompt's own key.

    Requests that share a new prefix (siblings of a fan-out) have the same first uncached page, so
    they break ties the same way on every replica, also before a replica has read another's pending
    entries: a burst spread over replicas lands on one worker. New conversations behind a shared
    system prompt differ at that page (their own content) and still spread over tied workers. Where
    the candidates hold different prefixes, the holder's terms decide and ties stay per prompt. On the
    traces' fleet simulation the key changed hit rates only within the spread that any reseeding of
    the tie-break gives (about +-2 points of the ideal at 8 workers)."""
    n = len(p.block_hashes)
    if n == 0:
        return p.key
    held = [(matches.get(c.worker_id) or matches.get(c.addr) or NO_HIT).raw_blocks for c in cands]
    if not held or min(held) != max(held):
        return p.key
    return int(p.block_hashes[min(held[0], n - 1)]).to_bytes(HASH_BYTES, "big")


def _usable(src: object) -> bool:
    return _flag(src, "ready") and _flag(src, "redis_ok")


def _flag(obj: object, name: str) -> bool:
    value = getattr(obj, name, False)
    if hasattr(value, "is_set"):
        return bool(value.is_set())
    if callable(value):
        return bool(value())
    return bool(value)


# -- candidates from a worker pool ---------------------------------------------------------------
def candidate_from_record(r: WorkerRecord, healthy: bool = True) -> Candidate:
    labels = r.labels or {}
    try:
        tps = float(labels.get("prefill_tokens_per_s", 0) or 0)
    except ValueError:
        tps = 0.0
    return Candidate(
        worker_id=r.worker_id,
        addr=r.addr,
        role=r.role,
        model=r.model,
        bucket=labels.get("bucket", ""),
        running=r.running,
        waiting=r.waiting,
        free_kv_tokens=r.free_kv_tokens,
        queued_tokens=r.queued_tokens,
        capacity_tokens=r.capacity_tokens,
        tokens_per_s=tps,
        has_load=True,
        healthy=healthy,
        incarnation=r.start_id,
        updated_at=r.updated_at,
    )


def candidates_of(pool: WorkerPool, role: Role) -> list[Candidate]:
    """The pool's routable workers as candidates: with their Redis load when the pool has records
    (`routable_records(role)`, RedisWorkerPool), else by address only."""
    own = getattr(pool, "candidates", None)
    if own is not None:  # a pool that knows workers beyond their records (KubernetesWorkerPool)
        return list(own(role))
    records = getattr(pool, "routable_records", None)
    if records is not None:
        return [candidate_from_record(r) for r in records(role)]
    workers = pool.prefill_workers() if role == "prefill" else pool.decode_workers()
    return [Candidate(worker_id=w.addr, addr=w.addr, role=role, model=w.model) for w in workers]


class CandidateSource:
    """`candidates_of(pool, role)`, rebuilt only when the pool's snapshot changed (a pool with a
    `version`, RedisWorkerPool); the lists it returns are shared: callers do not mutate them."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self._cache: dict[str, tuple[int, list[Candidate]]] = {}

    def __call__(self, role: Role) -> list[Candidate]:
        version = getattr(self.pool, "version", None)
        if version is None:
            return candidates_of(self.pool, role)
        cached = self._cache.get(role)
        if cached is not None and cached[0] == version:
            return cached[1]
        cands = candidates_of(self.pool, role)  # read after the version: never older than it
        self._cache[role] = (version, cands)
        return cands
