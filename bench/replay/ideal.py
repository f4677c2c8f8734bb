"""The trace's ideal prefix-cache hit rate: token-exact prefix reuse with an infinite cache that has
seen every earlier request.

A request's ideal hit is the longest prefix it shares, token for token, with any earlier prompt.
With prompts built by bench/replay/prompts.py that follows from the hash ids alone. Walk the
request's blocks in order: a block whose id was sent before shares its tokens up to the longest
take of that id sent so far (a partial block is the start of its id's full block); the walk stops
at the first block not shared whole. A block whose id is new shares nothing, unless it continues
an earlier prompt (`continued`, from `Continuations.plan`): then the request starts with that
whole earlier prompt. Hit = the longer of the two. Ideal = sum of hits / sum of input tokens.

    earlier  [ 1 ][ 2 ][ 3: 10 ]        block 32
    later    [ 1 ][ 2 ][ 3: 20 ]        -> 64 + 10 (only 10 tokens of block 3 were ever sent)
    cont.    [ 1 ][ 2 ][ 4: 10 of 3, 22 own ][ 5 ]   -> 74, the earlier prompt whole

With a hybrid-SWA cache (window W) a hit is only resumable where the window before its end kept
SWA KV. A hit that ends at an earlier prompt's end (a repeat, a continuation) is, as the engine
caches prompt ends; one that ends where the request branches off *inside* an earlier prompt needs
SWA KV there, which the engine keeps only at branch points a later request re-computed. So this is
the window-W ideal only if every prefix end kept its window; it is the right reference for both.

No real cache beats it: a server's hit is also page-aligned, window-safe, bounded by eviction, by
which worker holds the prefix, and by the last token it must compute for the first output.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping, Sequence

from bench.replay.prompts import BlockPrompt, block_take


def shared_prefix(r: BlockPrompt, held: Mapping[int, int]) -> int:
    """Tokens of `r`'s prompt shared, from its start, with blocks of which `held[h]` tokens are known
    (hash id -> most tokens of its block held): the walk of the module doc, without continuations."""
    hit = 0
    for i, h in enumerate(r.hash_ids):
        take = block_take(r, i)
        shared = min(take, held.get(h, 0))
        hit += shared
        if shared < take:
            break
    return hit


def record(r: BlockPrompt, held: MutableMapping[int, int]) -> None:
    """Add `r`'s blocks to `held` (hash id -> most tokens of its block held)."""
    for i, h in enumerate(r.hash_ids):
        held[h] = max(held.get(h, 0), block_take(r, i))


def ideal_hit_tokens(requests: Iterable[BlockPrompt], continued: Sequence[int] | None = None) -> list[int]:
    """Hit tokens of each request under an infinite cache, in the order given. `continued[k]`: the
    length of the earlier prompt request k starts with by continuation (None or empty: no continuations)."""
    sent: dict[int, int] = {}  # hash id -> most tokens of its block any earlier request held
    hits = []
    for k, r in enumerate(requests):
        hits.append(max(shared_prefix(r, sent), continued[k] if continued else 0))
        record(r, sent)
    return hits


def ideal_hit_rate(requests: Sequence[BlockPrompt], continued: Sequence[int] | None = None) -> float:
    total = sum(r.input_length for r in requests)
    return sum(ideal_hit_tokens(requests, continued)) / total if total else 0.0
