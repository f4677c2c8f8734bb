"""Pickers: order the scored candidates, best first, the same way on every router replica.

Ties (scores equal to 1e-9) are broken by a hash of (request key, worker id): deterministic for a
given request on every replica, yet spread over the tied workers across different prompts. Not
round robin, not "least outstanding from this router": both depend on the replica's own history,
and two replicas would then send the same request to different workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from services.router.policy.base import Candidate, Picker, RouteRequest

SCORE_DIGITS = 9  # scores closer than this are ties (float noise never decides)


def tiebreak(key: bytes, worker_id: str) -> int:
    """A stable pseudo-random rank of `worker_id` for the request `key` (lower goes first)."""
    h = hashlib.blake2b(key, digest_size=8)
    h.update(worker_id.encode())
    return int.from_bytes(h.digest(), "big")


class MaxScorePicker(Picker):
    name = "max_score"

    def order(self, req: RouteRequest, cands: Sequence[Candidate], scores: Sequence[float]) -> list[int]:
        rounded = [-round(s, SCORE_DIGITS) for s in scores]
        order = sorted(range(len(cands)), key=rounded.__getitem__)
        out: list[int] = []
        i = 0
        while i < len(order):  # runs of equal scores: hashed only where there is a tie
            j = i + 1
            while j < len(order) and rounded[order[j]] == rounded[order[i]]:
                j += 1
            run = order[i:j]
            if len(run) > 1:
                run.sort(key=lambda k: tiebreak(req.key, cands[k].worker_id))
            out += run
            i = j
        return out
