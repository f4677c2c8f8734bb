"""Filters: which candidates may take the request at all.

health         drop workers known to be unhealthy, and workers of another model
fits           drop workers whose KV cannot hold the request (prefill: capacity >= prompt;
               decode: free KV >= prompt + max_tokens), unless none fits: the loads are a few
               heartbeats old, and the worker's own admission (Reserve) has the final word
length_bucket  prefill pools by prompt length (PolicyConfig.buckets); a worker's pool is its
               labels["bucket"], unlabelled workers serve every length. When the prompt's
               pool has no worker left, the nearest pool that has one serves it (equally near:
               the longer pool, whose workers can hold the prompt)
"""

from __future__ import annotations

from services.router.policy.base import Candidate, Filter, RouteRequest, Trace
from services.router.policy.config import LengthBucket

ANY_BUCKET = -1


class HealthFilter(Filter):
    name = "health"

    def apply(self, req: RouteRequest, cands: list[Candidate], trace: Trace) -> list[Candidate]:
        model = req.model
        return [c for c in cands if c.healthy and (not model or not c.model or c.model == model)]


class FitsFilter(Filter):
    name = "fits"

    def apply(self, req: RouteRequest, cands: list[Candidate], trace: Trace) -> list[Candidate]:
        fit = [c for c in cands if not c.has_load or self._room(c) >= self._need(req, c)]
        if len(fit) < len(cands):
            trace.notes["fits"] = "filtered" if fit else "none_fit"
        return fit or cands

    @staticmethod
    def _need(req: RouteRequest, c: Candidate) -> int:
        return req.prompt_len + (req.max_tokens if c.role == "decode" else 0)

    @staticmethod
    def _room(c: Candidate) -> int:
        return c.free_kv_tokens if c.role == "decode" else c.capacity_tokens


def bucket_index(buckets: tuple[LengthBucket, ...], prompt_len: int) -> int:
    """The pool of a prompt: the first bucket it fits in (the last one if it fits in none)."""
    for i, b in enumerate(buckets):
        if prompt_len <= b.max_tokens:
            return i
    return len(buckets) - 1


class LengthBucketFilter(Filter):
    name = "length_bucket"

    def apply(self, req: RouteRequest, cands: list[Candidate], trace: Trace) -> list[Candidate]:
        buckets = self.config.buckets
        index = {b.name: i for i, b in enumerate(buckets)}
        target = bucket_index(buckets, req.prompt_len)
        by_bucket: dict[int, list[Candidate]] = {}
        for c in cands:  # unknown bucket names serve every length, like unlabelled workers
            by_bucket.setdefault(index.get(c.bucket, ANY_BUCKET), []).append(c)
        trace.notes["bucket"] = buckets[target].name
        pooled = by_bucket.get(target, []) + by_bucket.get(ANY_BUCKET, [])
        if pooled:
            return pooled
        nearest = min((i for i in by_bucket), key=lambda i: (abs(i - target), -i), default=None)
        if nearest is None:
            return cands
        trace.notes["bucket"] = buckets[nearest].name
        trace.notes["bucket_fallback"] = buckets[target].name
        return by_bucket[nearest]
