"""The fleet's capacity bound for a hybrid-SWA model: one LRU cache that resumes only where the engine can.

`analysis.lru_bound` lets a prompt resume at the end of any cached prefix: right for full attention
(window 0), unreachable with a window. With sliding-window layers a prefix is resumable only where the
SWA KV of the `window` tokens before its end was kept, and the engine keeps it at *retention points*
(services/engine/kv/radix_cache.py): where an earlier prompt ended, and at a branch point (the end of
a prefix two prompts share) once a later prompt has computed it. So, for one cache of the whole
fleet's capacity, over the requests in order:

    raw      = the prompt's prefix whose blocks are cached (as lru_bound walks it)
    resume   = the longest retention point within `raw` whose block is cached (0 if none)
    then     retention points += this prompt's end, and the point where it left the cached path

Request 1 = D + a, request 2 = D + b (D a shared document of whole blocks): request 2 resumes at 0
(D's end was never a prompt end) and leaves a branch point at D's end, so request 3 = D + c resumes
there. A continued prompt (a next turn that starts with an earlier prompt) resumes at that prompt's
end while the block it ends in is cached. No router reaches more with the same total KV; with no
window (every position a retention point) the walk is lru_bound's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from bench.replay.ideal import record, shared_prefix
from bench.replay.prompts import NO_CONTINUATIONS, BlockPrompt, Continuations, block_take

Point = tuple[int, int]  # (hash id of the block the point ends in, tokens of that block before it)


def window_lru_bound(
    planned: Sequence[BlockPrompt], capacity_tokens: int, cont: Continuations = NO_CONTINUATIONS
) -> float:
    """Hit rate of one LRU cache of `capacity_tokens` that resumes only at retention points."""
    cache: OrderedDict[int, int] = OrderedDict()  # hash id -> most tokens of it cached
    points: dict[int, set[int]] = {}  # hash id -> offsets in its block where a tail is kept
    hits = total = 0
    for k, r in enumerate(planned):
        if not r.hash_ids:
            continue
        raw = shared_prefix(r, cache)
        resume, walked, full = 0, 0, 0  # full: blocks of r wholly cached from the start
        for i, h in enumerate(r.hash_ids):
            take = block_take(r, i)
            if walked + take > raw:
                break
            walked += take
            full = i + 1
            if take in points.get(h, ()):
                resume = walked
        if cont.continued and cont.continued[k]:  # a next turn: the earlier prompt's end
            i = cont.continued[k] // r.block_size
            parent, n = cont.inherit[r.hash_ids[i]]
            if raw >= i * r.block_size and parent in cache and n in points.get(parent, ()):
                resume = max(resume, cont.continued[k])
        hits += resume
        total += r.input_length
        record(r, cache)
        last = len(r.hash_ids) - 1
        points.setdefault(r.hash_ids[last], set()).add(block_take(r, last))  # its prompt end
        if 0 < full <= last:  # it left the cached path after `full` blocks: a branch point it computed
            points.setdefault(r.hash_ids[full - 1], set()).add(block_take(r, full - 1))
        for h in r.hash_ids:
            cache.move_to_end(h)
        while len(cache) * r.block_size > capacity_tokens:
            gone, _ = cache.popitem(last=False)
            points.pop(gone, None)
    return hits / total if total else 0.0
