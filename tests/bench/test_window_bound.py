"""bench/compare/window_bound.py: the fleet's capacity bound with a window, against a token-level
re-computation (prompts as token tuples, retention points as token prefixes) on random prompt trees,
and the cases of its module doc by hand."""

from __future__ import annotations

import random

import pytest

from bench.compare import analysis
from bench.compare.window_bound import window_lru_bound
from bench.replay.plan import PlannedRequest
from bench.replay.prompts import Continuations

BLOCK = 4


def _req(i: int, ids: tuple[int, ...], length: int) -> PlannedRequest:
    return PlannedRequest(index=i, send_at_s=float(i), input_length=length, output_length=1, hash_ids=ids,
                          block_size=BLOCK)  # fmt: skip


def _tokens(r: PlannedRequest) -> tuple[tuple[int, int], ...]:
    out: list[tuple[int, int]] = []
    for i, h in enumerate(r.hash_ids):
        take = min(BLOCK, r.input_length - i * BLOCK)
        out += [(h, j) for j in range(take)]
    return tuple(out)


def _reference(reqs: list[PlannedRequest]) -> float:
    """No eviction: resume at the longest earlier prompt end or computed branch point within the
    longest prefix shared with any earlier prompt."""
    prefixes: set[tuple[tuple[int, int], ...]] = set()
    points: set[tuple[tuple[int, int], ...]] = set()
    hits = total = 0
    for r in reqs:
        t = _tokens(r)
        raw = max((p for p in range(len(t) + 1) if t[:p] in prefixes), default=0)
        hits += max((p for p in range(raw + 1) if t[:p] in points), default=0)
        total += len(t)
        prefixes.update(t[:p] for p in range(len(t) + 1))
        points.add(t)
        if 0 < raw < len(t):
            points.add(t[:raw])
    return hits / total


def _tree_prompts(rng: random.Random, n: int) -> list[PlannedRequest]:
    """Paths in a random tree of whole blocks (an id per tree node: chained like Mooncake's ids),
    each ending in its own partial block or a whole one; later prompts revisit earlier paths."""
    children: dict[tuple[int, ...], list[int]] = {(): []}
    next_id = iter(range(1, 10**6))
    reqs: list[PlannedRequest] = []
    for i in range(n):
        path: tuple[int, ...] = ()
        for _ in range(rng.randrange(1, 6)):
            kids = children.setdefault(path, [])
            if kids and rng.random() < 0.7:
                step = rng.choice(kids)
            else:
                step = next(next_id)
                kids.append(step)
            path += (step,)
        if rng.random() < 0.5:  # a partial last block of its own
            reqs.append(_req(i, path + (next(next_id),), len(path) * BLOCK + rng.randrange(1, BLOCK)))
        else:
            reqs.append(_req(i, path, len(path) * BLOCK))
    return reqs


@pytest.mark.parametrize("seed", range(20))
def test_with_room_for_everything_it_equals_the_token_level_recomputation(seed: int) -> None:
    reqs = _tree_prompts(random.Random(seed), 40)
    assert window_lru_bound(reqs, 1 << 30) == pytest.approx(_reference(reqs))
    assert window_lru_bound(reqs, 1 << 30) <= analysis.lru_bound(reqs, 1 << 30) + 1e-12


def test_a_shared_document_resumes_from_the_third_prompt_on() -> None:
    doc = (1, 2, 3)  # 12 tokens shared, never a prompt end
    reqs = [_req(0, doc + (10,), 14), _req(1, doc + (11,), 14), _req(2, doc + (12,), 14)]
    assert analysis.lru_bound(reqs, 1 << 30) == pytest.approx(24 / 42)  # any cached prefix resumes
    assert window_lru_bound(reqs, 1 << 30) == pytest.approx(12 / 42)  # only the third, at the branch point
    # room for 4 blocks: each prompt's last block evicts the one before (the document is refreshed)
    assert window_lru_bound(reqs, 16) == pytest.approx(12 / 42)
    # room for 3: the first prompt's last block evicts the document's first block: nothing resumes
    assert window_lru_bound(reqs, 12) == pytest.approx(0.0)


def test_a_next_turn_resumes_at_the_earlier_prompt_end_while_its_block_is_cached() -> None:
    reqs = [_req(0, (1, 2, 3), 10), _req(1, (1, 2, 4, 5), 14)]  # turn 2 continues turn 1 (10 tokens)
    cont = Continuations.plan(reqs)
    assert cont.continued == (0, 10)
    assert window_lru_bound(reqs, 1 << 30, cont) == pytest.approx(10 / 24)
    assert window_lru_bound(reqs, 1 << 30, cont) == pytest.approx(analysis.lru_bound(reqs, 1 << 30, cont))
    reqs = [reqs[0], _req(1, (7, 8, 9), 12), reqs[1]]  # 3 blocks between them: id 3 (the end) evicted
    cont = Continuations.plan(reqs)
    assert window_lru_bound(reqs, 12, cont) == pytest.approx(0.0)
