"""Prompts of exactly `input_length` tokens whose shared blocks are identical across requests.

The tokens of a block depend only on (seed, block size, hash_id): a seeded hash of them seeds a generator
that draws a full block of ids from the vocabulary range, and a partial last block is the first
tokens of that draw. So an equal hash id gives identical tokens wherever it appears, and different
ids give unrelated tokens (equal by chance with probability 1 / range per token).

    hash_ids  [ 7 ][ 9 ][ 4 ]          block 32, input_length 80
    tokens    [ 32 of id 7 ][ 32 of id 9 ][ first 16 of id 4 ]

Continuations (the default, `Continuations.plan`): a Mooncake conversation's next turn holds the
whole previous prompt, but the block where that prompt ended grew, so the trace names it with a
new id. Built from ids alone, that block's tokens would be unrelated and the next turn would never
reach the end of the previous prompt, the only place a hybrid-SWA cache keeps the window's KV. So
when a request's first new id (position i) follows i >= MIN_SHARED_BLOCKS full blocks that are
exactly an earlier request's full blocks, and that request's partial last block is shorter than
this request's block i, block i *inherits* it: its first tokens are the earlier request's last
tokens, the rest are its own draw. The request then starts with the earlier prompt, exactly.

    earlier   [ 7 ][ 9 ][ 4: 10 tokens ]                        block 32
    this      [ 7 ][ 9 ][ 5: the 10 tokens of 4, 22 of its own ][ 6 ... ]

Inheritance is decided once per id, at its first appearance (in trace order), so an equal id is
still identical tokens everywhere; of several earlier candidates the latest is taken (the previous
turn). One shared block is not enough: the conversation trace starts nearly every request with
the same first block (a common system prompt), so a request sharing only that with an earlier
short one is a new conversation, not its next turn.

Two ways to send them: token ids (OpenAI completions accept a list of ints), or text of one word
per token (`bench.word_tokens`: "t<N>"), whose length is exact only on servers that count one
word as one token, i.e. the simulated workers; a real tokenizer splits "t12345" into several.

The seed matters against a long-lived server: prompts of an earlier run with the same seed and
scale are still in its cache, so the replay draws a fresh seed unless one is given.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from bench.word_tokens import ids_to_text

PromptMode = Literal["ids", "text"]
PROMPT_MODES: tuple[PromptMode, ...] = ("ids", "text")
BlockMode = Literal["continue", "blocks"]
BLOCK_MODES: tuple[BlockMode, ...] = ("continue", "blocks")
MIN_SHARED_BLOCKS = 2  # full blocks a request must share with the one it continues


class BlockPrompt(Protocol):
    """A request as hash ids: `hash_ids[i]` names tokens [i * block_size, min((i + 1) * block_size, input_length))."""

    @property
    def input_length(self) -> int: ...
    @property
    def hash_ids(self) -> Sequence[int]: ...
    @property
    def block_size(self) -> int: ...


def block_take(r: BlockPrompt, i: int) -> int:
    """Tokens of block i that the request holds (block_size except a partial last block)."""
    return min(r.block_size, r.input_length - i * r.block_size)


@dataclass(frozen=True)
class VocabRange:
    """Token ids are drawn from [low, high)."""

    low: int = 100
    high: int = 100_000

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"vocabulary range must satisfy 0 <= low < high, got [{self.low}, {self.high})")

    @classmethod
    def parse(cls, spec: str) -> VocabRange:
        """`LOW:HIGH`, e.g. `100:49152` for SmolLM2's vocabulary."""
        low, sep, high = spec.partition(":")
        if not sep:
            raise ValueError(f"vocabulary range {spec!r}: expected LOW:HIGH")
        return cls(int(low), int(high))


@dataclass(frozen=True)
class Continuations:
    """Which blocks inherit an earlier prompt's last tokens (see the module doc).

    `inherit[h] = (parent, n)`: block h's first n tokens are the first n of block `parent` (the
    earlier request's partial last block, n tokens long). `continued[k]`: the length of the earlier
    prompt request k starts with (0: none), in the order planned."""

    inherit: Mapping[int, tuple[int, int]] = field(default_factory=dict)
    continued: tuple[int, ...] = ()

    @classmethod
    def plan(cls, requests: Sequence[BlockPrompt], min_shared: int = MIN_SHARED_BLOCKS) -> Continuations:
        seen: set[int] = set()
        tails: dict[int, list[tuple[int, int]]] = {}  # last full block's id -> [(partial id, its length)]
        inherit: dict[int, tuple[int, int]] = {}
        continued = []
        for r in requests:
            ids, cont = r.hash_ids, 0
            i = next(
                (k for k, h in enumerate(ids) if h not in seen), len(ids)
            )  # chained: the rest is new too
            if max(1, min_shared) <= i < len(ids):
                take = block_take(r, i)
                parent = next((t for t in reversed(tails.get(ids[i - 1], ())) if t[1] < take), None)
                if parent is not None:
                    inherit[ids[i]] = parent
                    cont = i * r.block_size + parent[1]
            continued.append(cont)
            seen.update(ids)
            last = block_take(r, len(ids) - 1) if ids else r.block_size
            if len(ids) >= 2 and last < r.block_size:
                tails.setdefault(ids[-2], []).append((ids[-1], last))
        return cls(inherit, tuple(continued))


NO_CONTINUATIONS = Continuations()


@dataclass(frozen=True)
class PromptBuilder:
    vocab: VocabRange = VocabRange()
    seed: int = 0
    continuations: Continuations = field(default=NO_CONTINUATIONS, compare=False)

    def _draw(self, hash_id: int, block_size: int) -> list[int]:
        key = f"{self.seed}:{block_size}:{hash_id}".encode()  # other scales, other seeds: other tokens
        digest = hashlib.blake2b(key, digest_size=16).digest()
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))
        return rng.integers(self.vocab.low, self.vocab.high, size=block_size).tolist()  # type: ignore[no-any-return]

    def block_tokens(self, hash_id: int, block_size: int, length: int | None = None) -> list[int]:
        """The first `length` (default all) tokens of the block named `hash_id`."""
        chain = [
            hash_id
        ]  # the block, the block it inherits from, ... (inheritance is acyclic: by trace order)
        while (up := self.continuations.inherit.get(chain[-1])) is not None:
            chain.append(up[0])
        tokens = self._draw(chain[-1], block_size)
        for h in reversed(chain[:-1]):
            n = self.continuations.inherit[h][1]
            tokens = tokens[:n] + self._draw(h, block_size)[n:]
        return tokens[: block_size if length is None else length]

    def token_ids(self, req: BlockPrompt) -> list[int]:
        ids: list[int] = []
        for i, h in enumerate(req.hash_ids):
            ids += self.block_tokens(h, req.block_size, block_take(req, i))
        return ids

    def prompt(self, req: BlockPrompt, mode: PromptMode) -> list[int] | str:
        ids = self.token_ids(req)
        return ids if mode == "ids" else ids_to_text(ids)
